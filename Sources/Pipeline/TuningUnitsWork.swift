import Foundation
import Imaging
import Kernels
import Logging
import Method
import Models
import Queue

// Data-parallel prompt tuning (docs/scale-out-tuning.md). Each optimizer step's logical batch is cut into
// units of the job's `prompt_micro_batch_size`; the owner publishes the step's parameters and units in
// nola.tuning_units, computes units itself, and any idle worker with the job's CLIP computes others. A
// unit's result depends only on (parameters at the step, its images, their strong views seeded by (seed,
// epoch, image)), and the owner sums results in unit order, so one worker and N workers give the same
// bits. Helpers compute units through the helping loop (`TuningHelpWork`), in the
// same slots as shards.


/// The owner's side: `computeUnits` of `runPromptTuning` through the database.
final class TuningOwner {
    let context: JobContext
    let encoder: PromptTunableEncoder
    let teacher: [Int]
    /// Path bytes of each readable image (the same path on every host).
    let files: [[UInt8]]
    let strongViews: ([Int], Int) throws -> [Float]
    let labelSmoothing: Double
    /// Figures for the stage's metrics event.
    private(set) var unitsHere = 0, unitsHelped = 0, steps = 0
    /// Units this owner took over from a worker whose lease had expired.
    private(set) var unitsRescued = 0
    private(set) var waitSeconds = 0.0, coordinationSeconds = 0.0, computeSeconds = 0.0
    /// The part of `computeSeconds` spent making the units' strong views (decoding images not kept yet, augmenting).
    private(set) var viewSeconds = 0.0
    /// Seconds from the units' results to the step's end (sum in unit order + AdamW): the serial step.
    private(set) var stepSeconds = 0.0
    private var returned: Date?
    private(set) var helpers: Set<String> = []
    /// Called with each unit this owner claims (unit, plan, state) once its views are in hand, so the
    /// views of the unit it will most likely compute next are computed meanwhile (`StrongViewSource.ahead`).
    var viewsAhead: ((Int, PromptStepPlan, PromptTuningState) -> Void)?

    init(context: JobContext, encoder: PromptTunableEncoder, teacher: [Int], files: [[UInt8]], labelSmoothing: Double,
         strongViews: @escaping ([Int], Int) throws -> [Float]) {
        self.context = context
        self.encoder = encoder
        self.teacher = teacher
        self.files = files
        self.labelSmoothing = labelSmoothing
        self.strongViews = strongViews
    }

    /// A fresh attempt: other attempts' units and parameter versions are removed.
    func begin() throws {
        try context.write { try TuningUnits.begin($0, context.job) }
    }

    func finish() throws {
        try context.withDatabase { try TuningUnits.finish($0, context.job) }
    }

    func compute(_ plan: PromptStepPlan, _ state: PromptTuningState) throws -> [PromptUnitResult] {
        let job = context.job
        var mark = Date()
        func lap(_ into: inout Double) { let now = Date(); into += now.timeIntervalSince(mark); mark = now }
        let blob = state.resultsSafeTensors(metadata: ["step": String(plan.step), "job_id": String(job.id)])
        let units = plan.units.enumerated().map { u, images in
            TuningUnits.NewUnit(unit: u, images: images, targets: images.map { teacher[$0] }, files: images.map { files[$0] })
        }
        try context.write {
            try TuningUnits.publish($0, job, step: plan.step, epoch: plan.epoch, logicalBatch: plan.batch.count,
                                    parameters: blob, units: units)
        }
        lap(&coordinationSeconds)
        let count = state.gradientCount
        var results: [Int: PromptUnitResult] = [:]
        let lease = context.settings.leaseSeconds
        while results.count < plan.units.count {
            if context.stopReason != nil { throw MethodError(.cancelled, "prompt tuning", "stopped") }
            if let claim = try context.withDatabase({
                try TuningUnits.claim($0, worker: job.worker, leaseSeconds: lease, jobID: job.id)
            }), claim.step == plan.step, claim.attempt == job.attempt {
                lap(&coordinationSeconds)
                if claim.rescued { unitsRescued += 1 }
                let started = Date()
                let pixels = try strongViews(claim.images, claim.epoch)
                viewSeconds += Date().timeIntervalSince(started)
                // Units are claimed in unit order: alone, this owner's next unit is the next one (with
                // helpers it may be another, and the views computed ahead are not used).
                viewsAhead?(claim.unit, plan, state)
                let result = try promptUnitGradient(encoder: encoder, state: state, targets: claim.targets, pixels: pixels,
                                                    logicalBatch: claim.logicalBatch, labelSmoothing: labelSmoothing)
                lap(&computeSeconds)
                results[claim.unit] = result
                unitsHere += 1
                // Written too (progress counts it; a helper that took the unit over after our lease
                // expired writes the same bytes, and the first write stays).
                _ = try context.withDatabase {
                    try TuningUnits.complete($0, claim, worker: job.worker, result: result.bytes, seconds: Date().timeIntervalSince(started))
                }
                lap(&coordinationSeconds)
                continue
            }
            let missing = plan.units.indices.filter { results[$0] == nil }
            let found = try context.withDatabase { try TuningUnits.results($0, job, step: plan.step, units: missing) }
            for done in found {
                guard let result = PromptUnitResult(bytes: done.result, count: count) else {
                    throw JobError.transient("unit \(done.unit) of prompt-tuning step \(plan.step) has a result of \(done.result.count) bytes, expected \(4 * count + 24) (written by \(done.worker))")
                }
                results[done.unit] = result
                unitsHelped += 1
                helpers.insert(done.worker)
            }
            // A look that found nothing new is part of the wait, not of the coordination.
            if found.isEmpty { lap(&waitSeconds) } else { lap(&coordinationSeconds) }
            if results.count < plan.units.count {
                // Units other workers hold: wait for their results (or for a lease to expire, when the
                // claim above takes the unit over).
                usleep(5_000)
                lap(&waitSeconds)
            }
        }
        steps += 1
        returned = Date()
        return plan.units.indices.map { results[$0]! }
    }

    /// Called first thing after each optimizer step (before a checkpoint is saved).
    func stepped() {
        if let returned { stepSeconds += Date().timeIntervalSince(returned) }
        returned = nil
    }
}

// MARK: helping

/// The prompt-tuning units of running jobs, for the helping loop (Sources/Daemon/WorkerHelp.swift), asked
/// before the shards: the owner waits for every unit of a step before it can take the next. What a unit
/// needs besides its claim — the job's encoder (its CLIP through the model cache), the images decoded so
/// far and the parameters of the step last read — is kept here across units, per job attempt, so only a
/// job's first unit on this worker loads anything. This worker computes one unit of a job at a time (a
/// job whose unit is in hand here is left out of the claims), so the kept encoder is never shared.
public final class TuningHelpWork: HelpWork, @unchecked Sendable {
    public let name = "tuning units"
    /// Jobs whose state is kept; older ones are dropped (their decoded images may hold up to 1 GiB).
    static let keptJobs = 2

    final class JobEntry: @unchecked Sendable {
        let attempt: Int
        let encoder: PromptTunableEncoder
        /// The job's images decoded here so far and its strong views (none computed ahead: a helper's
        /// next unit is whichever is free then).
        let views: StrongViewSource
        let parameters: NolaParameters
        let threads: Int
        /// The parameters of the step last read (only the one unit of the job in hand here touches it).
        var version: (step: Int, state: PromptTuningState)?
        /// When a unit last used it (read and written under TuningHelpWork's lock).
        var used = Date()

        init(attempt: Int, encoder: PromptTunableEncoder, decoded: DecodedImages, strong: StrongViewConfig, mean: [Float], std: [Float],
             parameters: NolaParameters, threads: Int) {
            self.attempt = attempt
            self.encoder = encoder
            views = StrongViewSource(decoded: decoded, seed: parameters.seed, config: strong, mean: mean, std: std)
            self.parameters = parameters
            self.threads = threads
        }
    }

    private let lock = NSLock()
    private var entries: [Int64: JobEntry] = [:]
    /// Jobs with a unit in hand on this worker.
    private var busy: Set<Int64> = []

    public init() {}

    public func claim(_ c: PostgresConnection, worker: String, settings: StageSettings, skipJobs: [Int64]) throws -> (any HelpUnit)? {
        let excluded = lock.withLock { Array(busy) } + skipJobs
        guard let claim = try TuningUnits.claim(c, worker: worker, leaseSeconds: settings.leaseSeconds, excludingJobs: excluded) else {
            return nil
        }
        lock.withLock { _ = busy.insert(claim.jobID) }
        return TuningUnit(claim: claim, worker: worker, work: self)
    }

    func ended(_ jobID: Int64) {
        lock.withLock { _ = busy.remove(jobID) }
    }

    /// The job attempt's kept state, made on its first unit here (loading its CLIP).
    func entry(for claim: TuningUnits.Claim, _ context: HelpContext) throws -> JobEntry {
        let kept = lock.withLock { () -> JobEntry? in
            guard let e = entries[claim.jobID], e.attempt == claim.attempt else { return nil }
            e.used = Date()
            return e
        }
        if let kept { return kept }
        let rows = try context.withDatabase { c in
            try c.query("SELECT parameters::text AS p FROM nola.jobs WHERE id = $1 AND attempt = $2", [claim.jobID, claim.attempt])
        }
        guard let row = rows.rows.first else { throw HelpStop.unwanted }
        let config = context.settings
        let job = try JobParameters(json: Data(try row.string("p").utf8))
        var p = job.method
        let clip: ModelCache.CLIPEntry
        do {
            let given = job.given.contains("clip_model") ? p.clipModel : nil
            let folder = try ValidateStage().modelFolder(config, configured: config.clipModel, parameter: given,
                                                         fallback: p.clipModel, what: "CLIP")
            p.clipModel = folder.lastPathComponent
            clip = try ModelCache.shared.clip(folder)
        } catch {
            throw HelpStop.cannotHelp("its CLIP does not load here: \(error)")
        }
        var strong = StrongViewConfig()
        strong.size = clip.model.imageSize
        if !p.colourJitter {
            strong.jitterProbability = 0
            strong.secondJitter = nil
        }
        let threads = min(job.threads ?? config.threads, config.threads)
        // The same encoder the owner builds (prompt tokens on ViT towers, none on MCi).
        let encoder = promptTunableEncoder(clip.model, promptCount: p.promptCount).encoder
        let e = JobEntry(attempt: claim.attempt, encoder: encoder, decoded: DecodedImages(files: [], threads: threads), strong: strong,
                         mean: clip.model.imageMean, std: clip.model.imageStd, parameters: p, threads: threads)
        lock.withLock {
            entries[claim.jobID] = e
            while entries.count > Self.keptJobs, let oldest = entries.min(by: { $0.value.used < $1.value.used })?.key {
                entries[oldest] = nil
            }
        }
        return e
    }

    /// The parameters of the claim's step (read once per step).
    func state(for claim: TuningUnits.Claim, _ e: JobEntry, _ context: HelpContext) throws -> PromptTuningState {
        if let v = e.version, v.step == claim.step { return v.state }
        guard let blob = try context.withDatabase({ try TuningUnits.parameters($0, jobID: claim.jobID, attempt: claim.attempt, step: claim.step) }) else {
            // The owner moved on (or a new attempt began): the unit is no longer wanted.
            throw HelpStop.unwanted
        }
        let state = try withSafeTensors(blob, what: "published parameters of job \(claim.jobID)") {
            try PromptTuningState(resultsSafeTensors: $0, encoder: e.encoder)
        }
        e.version = (claim.step, state)
        return state
    }
}

/// One claimed prompt-tuning unit: the gradient of its micro-batch at its step's parameters.
struct TuningUnit: HelpUnit {
    let claim: TuningUnits.Claim
    let worker: String
    let work: TuningHelpWork
    var jobID: Int64 { claim.jobID }
    var kind: String { "tune" }
    var quiet: Bool { true }
    var description: String { "job \(claim.jobID) tune step \(claim.step) unit \(claim.unit)" }

    func run(_ context: HelpContext) throws {
        defer { work.ended(claim.jobID) }
        try context.keepAlive()
        let started = Date()
        let job = try work.entry(for: claim, context)
        let state = try work.state(for: claim, job, context)
        // A job's first unit here loads its CLIP: renew the lease if that took a heartbeat or more.
        try context.keepAlive()
        job.views.decoded.learn(claim.images, files: claim.files.map { ImageFile(pathBytes: $0) })
        let pixels = try job.views.views(claim.images, epoch: claim.epoch)
        // The job's threads, as its owner computes with (the kernels' sums depend on the count).
        let result = try withThreads(job.threads) {
            try promptUnitGradient(encoder: job.encoder, state: state, targets: claim.targets, pixels: pixels,
                                   logicalBatch: claim.logicalBatch, labelSmoothing: job.parameters.labelSmoothing)
        }
        // SIGTERM or cancel during the arithmetic: give the unit back unwritten (another worker takes it at once).
        if let stop = context.stopReason { throw stop }
        try context.write {
            try TuningUnits.complete($0, claim, worker: worker, result: result.bytes, seconds: Date().timeIntervalSince(started))
        }
    }

    func renew(_ c: PostgresConnection, leaseSeconds: Double) throws -> LeaseRenewal {
        try TuningUnits.renewLease(c, claim, worker: worker, leaseSeconds: leaseSeconds)
    }

    func release(_ c: PostgresConnection, error: String?) throws {
        try TuningUnits.release(c, claim, worker: worker, error: error)
    }
}
