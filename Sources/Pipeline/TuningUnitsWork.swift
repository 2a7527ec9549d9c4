import Foundation
import Imaging
import Kernels
import Logging
import Method
import Models
import Queue

// Data-parallel prompt tuning (docs/scale-out-tuning.md). Each optimizer step's logical batch is cut into
// units of the job's `prompt_micro_batch_size`; the owner publishes the step's parameters and units in
// nola.tuning_units, computes units itself, and any idle worker with the job's CLIP computes others
// (`TuningHelper`). A unit's result depends only on (parameters at the step, its images, their strong
// views seeded by (seed, epoch, image)), and the owner sums results in unit order, so one worker and N
// workers give the same bits.


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
    /// Seconds from the units' results to the step's end (sum in unit order + AdamW): the serial step.
    private(set) var stepSeconds = 0.0
    private var returned: Date?
    private(set) var helpers: Set<String> = []

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
                let result = try promptUnitGradient(encoder: encoder, state: state, targets: claim.targets,
                                                    pixels: try strongViews(claim.images, claim.epoch),
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

/// A helper's side: claims units of any job's prompt tuning, computes them with the job's CLIP (loaded
/// through the model cache) and writes the results. Runs on its own thread with its own connection
/// while the daemon has a free job slot.
public final class TuningHelper: @unchecked Sendable {
    let config: StageSettings
    let worker: String
    let logger: Logger
    private let database: Database
    /// The job whose encoder and decoded images are kept (one at a time).
    private var current: (jobID: Int64, attempt: Int, encoder: PromptTunableEncoder, decoded: DecodedImages,
                          strong: StrongViewConfig, mean: [Float], std: [Float], parameters: NolaParameters, threads: Int)?
    /// The parameters of the step last read: (job, attempt, step) and the state.
    private var version: (key: String, state: PromptTuningState)?
    /// Jobs this worker cannot help (their CLIP does not load here), until the time given.
    private var refused: [Int64: Date] = [:]
    private(set) var unitsDone = 0

    public init(conninfo: String, limits: ConnectionLimits, settings: StageSettings, worker: String, logger: Logger) {
        self.config = settings
        self.worker = worker
        self.logger = logger
        database = Database(conninfo: conninfo, logger: logger, limits: limits)
    }

    /// Claims and computes one unit; false when there was none to claim.
    func helpOnce(shouldStop: () -> Bool) throws -> Bool {
        let now = Date()
        refused = refused.filter { $0.value > now }
        let lease = config.leaseSeconds
        guard let claim = try database.run(retryFor: 5, { c in
            try TuningUnits.claim(c, worker: worker, leaseSeconds: lease, excludingJobs: Array(refused.keys))
        }) else { return false }
        if shouldStop() {
            try database.run(retryFor: 5) { try TuningUnits.release($0, claim, worker: worker) }
            return false
        }
        do {
            let started = Date()
            let state = try parameters(for: claim)
            guard let job = current else { return false }
            let pixels = try job.decoded.strongViews(claim.images, epoch: claim.epoch, seed: job.parameters.seed, config: job.strong,
                                                     mean: job.mean, std: job.std, files: claim.files.map { ImageFile(pathBytes: $0) })
            // The job's threads, as its owner computes with (the kernels' sums depend on the count).
            let result = try withThreads(job.threads) {
                try promptUnitGradient(encoder: job.encoder, state: state, targets: claim.targets, pixels: pixels,
                                       logicalBatch: claim.logicalBatch, labelSmoothing: job.parameters.labelSmoothing)
            }
            if shouldStop() {
                try database.run(retryFor: 5) { try TuningUnits.release($0, claim, worker: worker) }
                return false
            }
            let written = try database.run(retryFor: 5) {
                try TuningUnits.complete($0, claim, worker: worker, result: result.bytes, seconds: Date().timeIntervalSince(started))
            }
            if written { unitsDone += 1 }
            return true
        } catch {
            // This worker cannot compute the job's units (its CLIP or images do not load here, or the
            // owner moved on): give the unit back and leave the job to others for a while.
            logger.warning("cannot help with prompt tuning of this job; its unit is given back",
                           metadata: ["job": "\(claim.jobID)", "step": "\(claim.step)", "unit": "\(claim.unit)", "error": "\(error)"])
            try? database.run(retryFor: 5) { try TuningUnits.release($0, claim, worker: worker) }
            refused[claim.jobID] = Date().addingTimeInterval(30)
            current = nil
            version = nil
            return false
        }
    }

    /// The job's encoder and images (loaded once per job attempt) and the parameters of the claim's step.
    private func parameters(for claim: TuningUnits.Claim) throws -> PromptTuningState {
        if current?.jobID != claim.jobID || current?.attempt != claim.attempt {
            current = nil
            version = nil
            let row = try database.run(retryFor: 5) { c in
                try c.query("SELECT parameters::text AS p FROM nola.jobs WHERE id = $1", [claim.jobID])
            }
            guard !row.isEmpty else { throw JobError.transient("job \(claim.jobID) is gone") }
            let job = try JobParameters(json: Data(try row[0].string("p").utf8))
            var p = job.method
            let given = job.given.contains("clip_model") ? p.clipModel : nil
            let folder = try ValidateStage().modelFolder(config, configured: config.clipModel, parameter: given,
                                                         fallback: p.clipModel, what: "CLIP")
            p.clipModel = folder.lastPathComponent
            let clip = try ModelCache.shared.clip(folder)
            var strong = StrongViewConfig()
            strong.size = clip.model.imageSize
            if !p.colourJitter {
                strong.jitterProbability = 0
                strong.secondJitter = nil
            }
            let threads = min(job.threads ?? config.threads, config.threads)
            // The same encoder the owner builds (prompt tokens on ViT towers, none on MCi).
            let encoder = promptTunableEncoder(clip.model, promptCount: p.promptCount).encoder
            current = (claim.jobID, claim.attempt, encoder, DecodedImages(files: [], threads: threads), strong,
                       clip.model.imageMean, clip.model.imageStd, p, threads)
        }
        let key = "\(claim.jobID)/\(claim.attempt)/\(claim.step)"
        if let version, version.key == key { return version.state }
        guard let blob = try database.run(retryFor: 5, { try TuningUnits.parameters($0, jobID: claim.jobID, attempt: claim.attempt, step: claim.step) }),
              let encoder = current?.encoder else {
            throw JobError.transient("the parameters of step \(claim.step) of job \(claim.jobID) are no longer published")
        }
        let state = try withSafeTensors(blob, what: "published parameters of job \(claim.jobID)") {
            try PromptTuningState(resultsSafeTensors: $0, encoder: encoder)
        }
        version = (key, state)
        return state
    }

    /// Gives back whatever this worker still holds (shutdown).
    func releaseAll() {
        try? database.run(retryFor: 1) { try TuningUnits.releaseAll($0, worker: worker) }
        database.close()
    }

    /// Helps until `shouldStop`; `mayHelp` says whether a job slot is free now. With nothing to claim it
    /// looks again after `poll` seconds, doubling up to `idlePoll` while nothing turns up (a worker that
    /// just helped looks again soon: the owner publishes the next step within milliseconds).
    public func run(poll: Double = 0.02, idlePoll: Double = 0.5, mayHelp: () -> Bool, shouldStop: () -> Bool) {
        defer { releaseAll() }
        var wait = poll
        while !shouldStop() {
            var worked = false
            if mayHelp() {
                do {
                    worked = try helpOnce(shouldStop: shouldStop)
                } catch {
                    if !shouldStop() { logger.debug("prompt-tuning help failed", metadata: ["error": "\(error)"]) }
                }
            }
            if worked {
                wait = poll
            } else {
                usleep(UInt32(wait * 1e6))
                wait = min(idlePoll, wait * 2)
            }
        }
    }
}
