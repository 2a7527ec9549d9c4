import Foundation
import Imaging
import Kernels
import Logging
import Method
import Models
import Queue

// The encode and label stages as shards (docs/scale-out.md). The job's owner cuts a stage's images into
// shards (nola.shards), works on them itself and waits until all are done; any other worker with a free slot
// claims one through the helping loop (HelpWork). Either way a shard is computed by `ShardComputation`, so
// per-image results do not depend on who computed them: images are batched in eights from the shard's first
// image, and shards start at multiples of eight.

/// What computing a shard needs from whoever runs it (the owner's job thread or a helper's unit thread).
protocol ShardRunner {
    /// A checkpoint: renews the shard's lease when due; throws once the shard must stop.
    func keepAlive() throws
    /// Runs `body` on the runner's connection (reconnecting and running it again: it must be idempotent).
    func onDatabase<T>(_ body: (PostgresConnection) throws -> T) throws -> T
    /// The error to throw when a guarded write found the shard no longer ours.
    func shardLost() -> Error
    var threads: Int { get }
    /// Testing aid (`image_delay_seconds`): a pause per image.
    var imageDelaySeconds: Double { get }
    var logger: Logger { get }
}

enum ShardComputation {
    /// Images per batch: the encode stage's.
    static var batchSize: Int { EncodeStage.batchSize }

    /// The shard size the owner cuts with: the configured one rounded up to a multiple of the batch.
    static func shardSize(configured: Int) -> Int {
        (max(1, configured) + batchSize - 1) / batchSize * batchSize
    }

    /// The view name of the weak-view features in the feature cache.
    static func weakView(imageSize: Int) -> String { "weak-\(imageSize)-clip" }

    /// Computes one shard and completes it (guarded). Throws `runner.shardLost()` when it is no longer ours.
    static func run(_ shard: ClaimedShard, collection: URL, runner: ShardRunner) throws {
        let clip = try ModelCache.shared.clip(URL(fileURLWithPath: shard.inputs.clipModel))
        var keys = [clip.identity.key]
        var dino: ModelCache.DINOEntry?
        if shard.ref.stage == "encode", let folder = shard.inputs.dinoModel {
            dino = try ModelCache.shared.dino(URL(fileURLWithPath: folder))
            keys.append(dino!.identity.key)
        }
        guard keys == shard.inputs.modelKeys else {
            throw HelpStop.cannotHelp("the model folders \(shard.inputs.clipModel)\(shard.inputs.dinoModel.map { " and " + $0 } ?? "") hold other weights here (\(keys.joined(separator: ", "))) than on the job's owner (\(shard.inputs.modelKeys.joined(separator: ", ")))")
        }
        let images = try runner.onDatabase { try ShardStore.images($0, jobID: shard.ref.jobID, paths: shard.paths) }
        guard images.map(\.path) == shard.paths else {
            throw JobError.transient("\(shard.ref): its images are no longer all recorded in nola.images")
        }
        let files = images.map { ImageFile(folder: collection.path, relative: $0.pathBytes ?? Array($0.path.utf8)) }
        switch shard.ref.stage {
        case "encode":
            try encode(shard, images: images, files: files, clip: clip, dino: dino, runner: runner)
        case "label":
            try label(shard, files: files, clip: clip, runner: runner)
        default:
            throw JobError.badInput("\(shard.ref): unknown stage")
        }
    }

    private static func pause(_ runner: ShardRunner, images: Int) {
        if runner.imageDelaySeconds > 0 { Thread.sleep(forTimeInterval: runner.imageDelaySeconds * Double(images)) }
    }

    /// CLIP and DINO features of the shard's weak views into the feature cache (images found there are
    /// skipped); the unreadable ones with their reasons on the shard's row.
    private static func encode(_ shard: ClaimedShard, images: [ImageRecord], files: [ImageFile], clip: ModelCache.CLIPEntry,
                               dino: ModelCache.DINOEntry?, runner: ShardRunner) throws {
        let size = clip.model.imageSize
        let view = weakView(imageSize: size)
        let e = clip.model.projectionDim, dd = dino?.model.config.hiddenSize ?? 0
        if let d = dino?.model, !d.accepts(height: size, width: size) {
            throw JobError.badInput("DINO model \(shard.inputs.dinoModel ?? "?") takes images of \(d.inputSizeRule), but CLIP's weak view is \(size)×\(size)")
        }
        let hashes = Array(Set(images.map(\.sha256)))
        let clipCached = try runner.onDatabase { try PipelineTables.cachedFeatures($0, model: clip.identity.key, view: view, sha256: hashes, dimension: e) }
        var dinoCached: [String: [Float]] = [:]
        if let dino {
            dinoCached = try runner.onDatabase { try PipelineTables.cachedFeatures($0, model: dino.identity.key, view: view, sha256: hashes, dimension: dd) }
        }
        let missing = images.indices.filter { clipCached[images[$0].sha256] == nil || (dino != nil && dinoCached[images[$0].sha256] == nil) }
        let config = Described.weakConfig(clip.model)
        let slot = 3 * size * size
        var unreadable: [String: String] = [:]
        for from in stride(from: 0, to: missing.count, by: batchSize) {
            try runner.keepAlive()
            let batch = Array(missing[from..<min(missing.count, from + batchSize)])
            pause(runner, images: batch.count)
            let decoded = weakViewBatch(batch.map { files[$0] }, config: config, threads: runner.threads)
            var ok: [Int] = []
            var pixels: [Float] = []
            for (j, i) in batch.enumerated() {
                if let error = decoded.errors[j] {
                    unreadable[images[i].path] = "\(error)"
                } else {
                    ok.append(i)
                    pixels += decoded.tensor[(j * slot)..<((j + 1) * slot)]
                }
            }
            guard !ok.isEmpty else { continue }
            let cf = clip.model.getImageFeatures(pixels: pixels, batch: ok.count)
            let clipRows = ok.enumerated().map { j, i in (sha256: images[i].sha256, values: Array(cf[(j * e)..<((j + 1) * e)])) }
            var dinoRows: [(sha256: String, values: [Float])] = []
            if let dino {
                let df = Described.dinoPixels(pixels, model: clip.model).withUnsafeBufferPointer {
                    dino.model.clsFeatures(pixels: $0.baseAddress!, batch: ok.count, height: size, width: size)
                }
                dinoRows = ok.enumerated().map { j, i in (sha256: images[i].sha256, values: Array(df[(j * dd)..<((j + 1) * dd)])) }
            }
            let written = try runner.onDatabase { c in
                try ShardStore.guardedWrite(c, shard.ref) { c in
                    try PipelineTables.cacheFeatures(c, model: clip.identity.key, view: view, dimension: e, clipRows)
                    if let dino { try PipelineTables.cacheFeatures(c, model: dino.identity.key, view: view, dimension: dd, dinoRows) }
                }
            }
            guard written else { throw runner.shardLost() }
        }
        try runner.keepAlive()
        guard try runner.onDatabase({ try ShardStore.complete($0, shard.ref, result: nil, unreadable: unreadable) }) else {
            throw runner.shardLost()
        }
    }

    /// The tuned model's class probabilities for the shard's (readable) images, on the shard's row.
    private static func label(_ shard: ClaimedShard, files: [ImageFile], clip: ModelCache.CLIPEntry, runner: ShardRunner) throws {
        guard let blob = shard.inputs.blob else { throw JobError.transient("\(shard.ref): no tuned prompts stored for the shards") }
        // Decoded once per (job, shard inputs, model) on this worker, and reused by its later label shards
        // (the inputs' key is a SHA-256 over the blob and the model identities).
        let (state, encoder) = try TunedParametersCache.shared.decoded(key: "\(shard.ref.jobID)/\(shard.inputs.key)/\(clip.identity.key)") {
            runner.logger.info("label shards: decoding the job's tuned parameters (kept for its later label shards here)",
                               metadata: ["job": "\(shard.ref.jobID)"])
            return try withSafeTensors(blob, what: "tuned prompts of job \(shard.ref.jobID) (label shards)") { file in
                guard let shape = file.shape(of: PromptTuningState.promptsName), shape.count == 2 else {
                    throw JobError.badInput("tuned prompts of job \(shard.ref.jobID): no 2-D \(PromptTuningState.promptsName)")
                }
                let encoder = promptTunableEncoder(clip.model, promptCount: shape[0]).encoder
                return (try PromptTuningState(resultsSafeTensors: file, encoder: encoder), encoder)
            }
        }
        let config = Described.weakConfig(clip.model)
        let c = state.head.shape[0]
        var probabilities: [Float] = []
        probabilities.reserveCapacity(files.count * c)
        for from in stride(from: 0, to: files.count, by: batchSize) {
            try runner.keepAlive()
            let batch = Array(files[from..<min(files.count, from + batchSize)])
            pause(runner, images: batch.count)
            let (pixels, errors) = weakViewBatch(batch, config: config, threads: runner.threads)
            if let (j, error) = errors.first {
                throw JobError.transient("\(shard.paths[from + j]) became unreadable: \(error)")
            }
            let features: [Float]
            do {
                features = try encoder.features(pixels: pixels, batch: batch.count, prompts: state.prompts.values, layerNorms: state.layerNorms)
            } catch let error as MethodError {
                throw JobError.badInput("\(error)")
            }
            probabilities += labelProbabilities(features: features, head: state.head.values, classCount: c)
        }
        try runner.keepAlive()
        guard try runner.onDatabase({ try ShardStore.complete($0, shard.ref, result: FloatBytes.encode(probabilities), unreadable: [:]) }) else {
            throw runner.shardLost()
        }
    }

    // MARK: the owner's side

    private static func release(_ context: JobContext, _ shard: ShardRef, error: String?) {
        do {
            _ = try context.withDatabase { try ShardStore.release($0, shard, error: error) }
        } catch {
            context.logger.warning("could not give the shard back; its lease expires", metadata: ["shard": "\(shard)", "error": "\(error)"])
        }
    }

    /// The owner's part of a sharded stage: makes the stage's shards (kept when a resumed attempt made the
    /// same ones), works on them itself and waits until all are done (others' expired leases are claimed
    /// again), reporting progress in images. Returns the done shards in order and who did them.
    static func runStage(_ context: JobContext, stage: String, paths: [String], clipFolder: URL, dinoFolder: URL?,
                         modelKeys: [String], blob: [UInt8]?) throws -> (results: [ShardResult], workers: [String: Int], kept: Bool) {
        let size = shardSize(configured: context.settings.shardSize)
        let shards = ShardStore.cut(paths, size: size)
        let key = ShardStore.key(stage: stage, clipModel: clipFolder.path, dinoModel: dinoFolder?.path, modelKeys: modelKeys,
                                 blob: blob, shards: shards)
        let inputs = ShardInputs(key: key, clipModel: clipFolder.path, dinoModel: dinoFolder?.path, modelKeys: modelKeys, blob: blob)
        var kept = false
        try context.write { c in
            guard let k = try ShardStore.prepare(c, context.job, stage: stage, inputs: inputs, shards: shards) else { return false }
            kept = k
            return true
        }
        let total = paths.count
        var waitedSince: Date?
        while true {
            try context.checkCancelled()
            let claimed = try context.withDatabase {
                try ShardStore.claim($0, worker: context.job.worker, leaseSeconds: context.settings.leaseSeconds, job: context.jobID, stages: [stage])
            }
            if let claimed {
                waitedSince = nil
                let runner = OwnerShardRunner(context: context, shard: claimed.ref)
                do {
                    try run(claimed, collection: context.collection, runner: runner)
                } catch OwnerShardRunner.Lost.lost {
                    // Slower than its lease: another worker took the shard over and completes it.
                    context.logger.warning("shard lease lost to another worker; it completes the shard", metadata: ["shard": "\(claimed.ref)"])
                } catch let stop as HelpStop {
                    release(context, claimed.ref, error: "\(stop)")
                    throw JobError.badInput("\(claimed.ref): \(stop)")
                } catch {
                    // Stopping (cancel, shutdown, timeout) or failing: the shard goes back at once rather than when
                    // its lease expires; a resumed attempt, or a helper, takes it up again.
                    if case JobError.stopped(.leaseLost) = error {} else { release(context, claimed.ref, error: nil) }
                    throw error
                }
            }
            let progress = try context.withDatabase { try ShardStore.progress($0, jobID: context.jobID, stage: stage) }
            try context.reportProgress(stage: stage, done: min(total, progress.imagesDone), total: total)
            if progress.done == progress.total { break }
            if claimed == nil {
                // Every remaining shard is held by another worker: wait for them (their lease expires if they die).
                if waitedSince == nil { waitedSince = Date() }
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
        let results = try context.withDatabase { try ShardStore.results($0, jobID: context.jobID, stage: stage) }
        guard results.map(\.index) == Array(shards.indices), results.map(\.paths) == shards else {
            throw JobError.transient("the \(stage) shards of job \(context.jobID) changed while they were computed")
        }
        let workers = try context.withDatabase { try ShardStore.doneBy($0, jobID: context.jobID, stage: stage) }
        return (results, workers, kept)
    }
}

/// The owner computing one of its own job's shards on the job's thread.
struct OwnerShardRunner: ShardRunner {
    enum Lost: Error { case lost }
    let context: JobContext
    let shard: ShardRef
    private let lastRenewal = LockedDate()

    init(context: JobContext, shard: ShardRef) {
        self.context = context
        self.shard = shard
    }

    func keepAlive() throws {
        try context.checkCancelled()
        guard lastRenewal.elapsed >= context.settings.heartbeatSeconds else { return }
        let renewal = try context.withDatabase { try ShardStore.renew($0, shard, leaseSeconds: context.settings.leaseSeconds) }
        lastRenewal.reset()
        if renewal == .lost { throw Lost.lost }
    }

    func onDatabase<T>(_ body: (PostgresConnection) throws -> T) throws -> T { try context.withDatabase(body) }
    func shardLost() -> Error { Lost.lost }
    var threads: Int { context.threads }
    var imageDelaySeconds: Double { context.settings.imageDelaySeconds }
    var logger: Logger { context.logger }
}

/// The tuned parameters of label shards, decoded from the blob once per key and kept for the worker's later
/// shards of the same job (the last few keys).
final class TunedParametersCache: @unchecked Sendable {
    static let shared = TunedParametersCache()
    static let capacity = 4
    private let lock = NSLock()
    private var entries: [(key: String, state: PromptTuningState, encoder: PromptTunableEncoder)] = []
    /// Blobs decoded so far (tests read it).
    private(set) var decodes = 0

    func decoded(key: String, _ make: () throws -> (PromptTuningState, PromptTunableEncoder)) throws -> (PromptTuningState, PromptTunableEncoder) {
        if let hit = lock.withLock({ entries.first { $0.key == key } }) { return (hit.state, hit.encoder) }
        let (state, encoder) = try make()
        lock.withLock {
            decodes += 1
            entries.removeAll { $0.key == key }
            entries.insert((key, state, encoder), at: 0)
            if entries.count > Self.capacity { entries.removeLast() }
        }
        return (state, encoder)
    }
}

final class LockedDate: @unchecked Sendable {
    private let lock = NSLock()
    private var date = Date()
    var elapsed: Double { lock.withLock { Date().timeIntervalSince(date) } }
    func reset() { lock.withLock { date = Date() } }
}

// MARK: helping

/// The encode and label shards of running jobs, for the helping loop.
public struct ShardHelpWork: HelpWork {
    public let name = "shards"
    public init() {}

    public func claim(_ c: PostgresConnection, worker: String, settings: StageSettings, skipJobs: [Int64]) throws -> (any HelpUnit)? {
        guard let shard = try ShardStore.claim(c, worker: worker, leaseSeconds: settings.leaseSeconds, skipJobs: skipJobs) else { return nil }
        return ShardUnit(shard: shard)
    }
}

struct ShardUnit: HelpUnit {
    let shard: ClaimedShard
    var jobID: Int64 { shard.ref.jobID }
    var kind: String { shard.ref.stage }
    var description: String { "\(shard.ref)" }

    func run(_ context: HelpContext) throws {
        let collection: URL
        do {
            collection = try CollectionAccess.resolve(shard.collection, roots: context.collectionRoots)
        } catch let error as JobError {
            throw HelpStop.cannotHelp("\(error)")
        }
        let requested = (try? JobParameters(json: Data(shard.parametersJSON.utf8)))?.threads
        let threads = min(requested ?? context.settings.threads, context.settings.threads)
        let runner = HelperShardRunner(context: context, threads: threads)
        try withThreads(threads) {
            try ShardComputation.run(shard, collection: collection, runner: runner)
        }
    }

    func renew(_ c: PostgresConnection, leaseSeconds: Double) throws -> LeaseRenewal {
        try ShardStore.renew(c, shard.ref, leaseSeconds: leaseSeconds)
    }

    func release(_ c: PostgresConnection, error: String?) throws {
        try ShardStore.release(c, shard.ref, error: error)
    }
}

struct HelperShardRunner: ShardRunner {
    let context: HelpContext
    let threads: Int
    func keepAlive() throws { try context.keepAlive() }
    func onDatabase<T>(_ body: (PostgresConnection) throws -> T) throws -> T { try context.withDatabase(body) }
    func shardLost() -> Error { HelpStop.leaseLost }
    var imageDelaySeconds: Double { context.settings.imageDelaySeconds }
    var logger: Logger { context.logger }
}
