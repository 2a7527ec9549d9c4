import Foundation
import Imaging
import Kernels
import Method
import Models
import Queue

/// Reads safetensors bytes (from PostgreSQL) through a private temporary file (the reader maps files).
/// A blob that cannot be read or restored fails the job with a sentence naming `what` (never the
/// temporary file), followed by `remedy` when given.
func withSafeTensors<T>(_ bytes: [UInt8], what: String, remedy: String? = nil, _ body: (SafeTensorsFile) throws -> T) throws -> T {
    let path = NSTemporaryDirectory() + "/nolad-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).safetensors"
    guard FileManager.default.createFile(atPath: path, contents: Data(bytes), attributes: [.posixPermissions: 0o600]) else {
        throw JobError.transient("cannot write a temporary file in \(NSTemporaryDirectory())")
    }
    defer { try? FileManager.default.removeItem(atPath: path) }
    let tail = remedy.map { "; " + $0 } ?? ""
    let file: SafeTensorsFile
    do {
        file = try SafeTensorsFile(path: path)
    } catch CheckpointError.unreadable(_, let reason) {
        throw JobError.badInput("\(what) cannot be read as safetensors: \(reason)\(tail)")
    } catch let error as CheckpointError {
        throw JobError.badInput("\(what): \(error)\(tail)")
    }
    do {
        return try body(file)
    } catch let error as CheckpointError {
        throw JobError.badInput("\(what): \(error)\(tail)")
    } catch let error as MethodError {
        throw JobError.badInput("\(what): \(error)\(tail)")
    }
}

/// Decoded images of a job for the strong views (`StrongViewSource`), kept while they fit a budget.
/// Images are named by their index among the job's readable images (the strong view's seed).
public final class DecodedImages: @unchecked Sendable {
    private var files: [Int: ImageFile]
    public let threads: Int
    private let lock = NSLock()
    private var images: [Int: RGBImage] = [:]
    private var bytes = 0
    static let budgetBytes = 1 << 30

    init(files: [ImageFile], threads: Int) {
        self.files = Dictionary(uniqueKeysWithValues: files.enumerated().map { ($0, $1) })
        self.threads = threads
    }

    /// Images already decoded (`nolad bench-job`'s synthetic ones), all kept whatever their size.
    public init(images: [RGBImage], threads: Int) {
        files = [:]
        self.threads = threads
        self.images = Dictionary(uniqueKeysWithValues: images.enumerated().map { ($0, $1) })
    }

    /// Files of images a helper learns unit by unit (the claim names them).
    func learn(_ indices: [Int], files given: [ImageFile]) {
        precondition(given.count == indices.count)
        lock.withLock { for (i, f) in zip(indices, given) { files[i] = f } }
    }

    func image(_ i: Int) throws -> RGBImage {
        if let hit = lock.withLock({ images[i] }) { return hit }
        guard let file = lock.withLock({ files[i] }) else { throw JobError.transient("image \(i) of the job is not known here") }
        let image = try decodeImage(at: file)
        lock.withLock {
            if bytes + image.pixels.count <= Self.budgetBytes {
                images[i] = image
                bytes += image.pixels.count
            }
        }
        return image
    }
}

// MARK: stage 3

struct TuneStage: NolaStage {
    let name = "tune"

    func run(_ taught: Taught, _ context: JobContext) throws -> Tuned {
        let encoded = taught.encoded
        if let source = encoded.validated.promptsFromJob { return Tuned(taught: taught, prompts: .fromJob(source)) }
        guard let stage2 = taught.stage2 else { throw JobError.transient("stage 2 did not run") }
        let start = Date()
        let p = encoded.parameters
        let clip = encoded.clip.model
        // prompt tokens after CLS on ViT towers; none on an MCi tower (its tuned variant trains its norms)
        let (encoder, promptCount) = promptTunableEncoder(clip, promptCount: p.promptCount)
        let c = context.classes.count, n = encoded.readable.count
        var state: PromptTuningState
        var teacher = stage2.teacherLabels
        // A stored checkpoint that cannot be restored, or does not fit, fails the job (bad input, not
        // retried) rather than being dropped: only this daemon writes nola.checkpoints, so such a row means
        // damage or another nolad version, which the operator should see; the sentence says how to start over.
        let startOver = "DELETE FROM nola.checkpoints WHERE job_id = \(context.jobID) to start prompt tuning over"
        if let saved = try context.withDatabase({ try PipelineTables.checkpoint($0, jobID: context.jobID) }) {
            let restored = try withSafeTensors(saved.blob, what: "checkpoint of job \(context.jobID)", remedy: startOver) {
                try PromptTuningState.restore(checkpointSafeTensors: $0)
            }
            state = restored.state
            let expectedNorms = encoder.initialLayerNorms().map { "\($0.name)\($0.shape)" }
            guard restored.teacherLabels.count == n, state.head.shape == [c, encoder.featureSize],
                  state.prompts.shape == [promptCount, encoder.hiddenSize],
                  state.layerNorms.map({ "\($0.name)\($0.shape)" }) == expectedNorms else {
                throw JobError.badInput("checkpoint of job \(context.jobID) does not fit this job (\(restored.teacherLabels.count) teacher labels for \(n) images, head \(state.head.shape), prompts \(state.prompts.shape)); \(startOver)")
            }
            teacher = restored.teacherLabels
            try context.recordEvent(stage: name, kind: "resumed", metrics: [
                "epoch": number(state.epoch), "step": number(state.step), "batch_in_epoch": number(state.batchInEpoch),
                "saved_at_epoch": number(saved.epoch), "saved_at_step": number(saved.step),
            ])
            context.logger.info("prompt tuning resumes from the checkpoint", metadata: ["epoch": "\(state.epoch)", "step": "\(state.step)"])
        } else {
            state = PromptTuningState(encoder: encoder, classifier: encoded.described.classifier, promptCount: promptCount, seed: p.seed)
        }
        let budgetMicro = promptMicroBatchSize(memoryBudgetBytes: context.settings.memoryBudgetMB << 20,
                                               bytesPerImage: encoder.trainingBytesPerImage, logicalBatch: p.promptBatchSize)
        // The micro-batch is the job's (its units are the same on every worker, so the result does not
        // depend on who runs it). It may exceed the collection or the logical batch (only what exists is
        // used), but not the worker's memory budget: the activations would be allocated at once and the
        // kernel's OOM killer would end the whole daemon.
        let micro = p.promptMicroBatchSize
        let used = min(micro, p.promptBatchSize, n)
        if used > budgetMicro {
            let gib = Double(used) * Double(encoder.trainingBytesPerImage) / Double(1 << 30)
            throw JobError.badInput("\(MethodError(.badParameter, NolaParameters.Key.promptMicroBatchSize.rawValue, "\(used) images need about \(String(format: "%.1f", gib)) GiB of prompt-tuning activations, more than this worker's memory_budget_mb \(context.settings.memoryBudgetMB); set it to at most \(budgetMicro), or raise memory_budget_mb"))")
        }
        let decoded = DecodedImages(files: (0..<n).map { encoded.file(context, readableIndex: $0) }, threads: context.threads)
        var strong = StrongViewConfig()
        strong.size = encoded.described.imageSize
        if !p.colourJitter {
            strong.jitterProbability = 0
            strong.secondJitter = nil
        }
        let perBatch = min(p.promptBatchSize, n)
        let batchesPerEpoch = promptBatches(order: Array(0..<n), batchSize: p.promptBatchSize).count
        // The training budget (docs/budget.md) caps the steps whatever the epochs ask for.
        let plannedSteps = p.promptEpochs * batchesPerEpoch
        let stepBudget = p.promptStepBudget(imageCount: n)
        let steps = stepBudget.map { min($0, plannedSteps) } ?? plannedSteps
        let total = max(1, steps * perBatch)
        var lastSave = Date()
        var savedStep = state.step
        var latest = state
        var withinBatch = 0
        var epochStart = Date()
        var imagesAtEpochStart = 0
        func save(_ s: PromptTuningState) throws {
            let blob = s.checkpointSafeTensors(teacherLabels: teacher)
            try context.write { try PipelineTables.saveCheckpoint($0, context.job, blob: blob, epoch: s.epoch, step: s.step) }
            lastSave = Date()
            savedStep = s.step
        }
        /// On a stop: the last completed step is saved (unless the job is no longer ours), then the stage ends.
        func stopped(_ reason: StopReason) -> JobError {
            if reason != .leaseLost && latest.step > savedStep {
                do {
                    try save(latest)
                    context.logger.info("prompt tuning stopped; checkpoint saved", metadata: ["epoch": "\(latest.epoch)", "step": "\(latest.step)"])
                } catch {
                    // The job resumes from the last checkpoint that was saved; say so in the log and, when
                    // the database still answers, in the job's events.
                    context.logger.error("prompt tuning stopped; the checkpoint could not be saved, a resume starts from the last saved step",
                                         metadata: ["step": "\(latest.step)", "saved_step": "\(savedStep)", "error": "\(error)"])
                    do {
                        try context.recordEvent(stage: name, kind: "checkpoint_not_saved", metrics: [
                            "step": .number(Double(latest.step)), "saved_step": .number(Double(savedStep)), "error": .string("\(error)"),
                        ])
                    } catch {
                        context.logger.error("could not record the unsaved checkpoint in the job's events", metadata: ["error": "\(error)"])
                    }
                }
            }
            return JobError.stopped(reason)
        }
        try context.reportProgress(stage: name, done: (state.epoch * batchesPerEpoch + state.batchInEpoch) * perBatch, total: total)
        let source = StrongViewSource(decoded: decoded, seed: p.seed, config: strong, mean: clip.imageMean, std: clip.imageStd)
        defer { source.close() }
        let views: ([Int], Int) throws -> [Float] = { indices, epoch in
            // Progress within the logical batch too (a full-size batch of 512 takes minutes).
            try context.reportProgress(stage: name, done: min(total, (latest.epoch * batchesPerEpoch + latest.batchInEpoch) * perBatch + withinBatch), total: total)
            withinBatch += indices.count
            return try source.views(indices, epoch: epoch)
        }
        // Every step's units go through nola.tuning_units, so idle workers can compute some of them.
        let owner = TuningOwner(context: context, encoder: encoder, teacher: teacher,
                                files: (0..<n).map { encoded.file(context, readableIndex: $0).pathBytes },
                                labelSmoothing: p.labelSmoothing, strongViews: views)
        owner.viewsAhead = { unit, plan, s in
            if let next = promptUnitAfter(unit, of: plan, state: s, imageCount: n, epochs: p.promptEpochs, batchSize: p.promptBatchSize,
                                          microBatchSize: p.promptMicroBatchSize, seed: p.seed) {
                source.ahead(next.images, epoch: next.epoch)
            }
        }
        try owner.begin()
        do {
            try runPromptTuning(encoder: encoder, state: &state, teacherLabels: teacher, parameters: p,
                                strongViews: views, computeUnits: { plan, s in try owner.compute(plan, s) },
                                shouldStop: { context.stopReason != nil },
                                onStep: { progress, s in
                owner.stepped()
                latest = s
                withinBatch = 0
                try context.reportProgress(stage: name, done: min(total, (progress.epoch * batchesPerEpoch + progress.batchInEpoch) * perBatch), total: total)
                if Date().timeIntervalSince(lastSave) >= context.settings.checkpointSeconds { try save(s) }
            }, onEpoch: { epoch, s in
                latest = s
                try save(s)
                let images = s.step * perBatch - imagesAtEpochStart
                var metrics: [String: JSONValue] = [
                    "epoch": number(epoch.epoch + 1), "epochs": number(p.promptEpochs), "loss": number(epoch.meanLoss),
                    "agreement": number(epoch.agreement), "mean_confidence": number(epoch.meanConfidence),
                    "seconds": seconds(since: epochStart),
                    "images_per_second": number(Double(max(0, images)) / max(1e-9, Date().timeIntervalSince(epochStart))),
                ]
                if p.stopPatience > 0 {
                    metrics["stable_epochs"] = number(epoch.stableEpochs)
                    metrics["stop_reason"] = epoch.stopReason.map(JSONValue.string) ?? .null
                }
                try context.recordEvent(stage: name, kind: "epoch", metrics: metrics)
                if let reason = epoch.stopReason {
                    context.logger.info("prompt tuning stops early", metadata: ["epoch": "\(epoch.epoch + 1)", "reason": "\(reason)"])
                }
                epochStart = Date()
                imagesAtEpochStart = s.step * perBatch
            })
        } catch let error as MethodError where error.code == .cancelled {
            throw stopped(context.stopReason ?? .shutdown)
        } catch JobError.stopped(let reason) {
            throw stopped(reason)
        } catch where !(error is JobError) && context.stopReason != nil {
            // A write failed while a stop was pending (say, the epoch's checkpoint): the stop wins, and
            // `stopped` tries the save once more and records it when that fails too.
            context.logger.warning("prompt tuning failed while stopping", metadata: ["error": "\(error)"])
            throw stopped(context.stopReason ?? .shutdown)
        } catch let error as MethodError {
            throw JobError.badInput("\(error)")
        }
        // Ended by the budget (not by the epochs or the stopping rule): the state at the cap is the
        // checkpoint a resumed attempt starts from, and it takes no further step.
        let atBudget = stepBudget.map { state.step >= $0 } == true && state.epoch < p.promptEpochs && !state.stoppedEarly
        if atBudget, let budget = p.promptViewBudget, let cap = stepBudget {
            if state.step > savedStep { try save(state) }
            try context.recordEvent(stage: name, kind: "budget_reached", metrics: [
                "view_budget": number(budget), "step_budget": number(cap), "steps": number(state.step), "planned_steps": number(plannedSteps),
                "epoch": number(state.epoch), "batch_in_epoch": number(state.batchInEpoch),
                "strong_views": number(state.step * perBatch),
            ])
            context.logger.info("prompt tuning ends at its step budget", metadata: [
                "steps": "\(state.step)", "planned_steps": "\(plannedSteps)", "epoch": "\(state.epoch)"])
        }
        try owner.finish()
        try context.reportProgress(stage: name, done: total, total: total)
        // With the stopping rule: the epoch it stopped after (nil: it ran every epoch) and why.
        let stopReason = state.stoppedEarly ? PromptStopRule(patience: p.stopPatience, tolerance: p.stopTolerance).reason : nil
        try context.recordEvent(stage: name, kind: "metrics", metrics: [
            "epochs": number(p.promptEpochs), "epochs_run": number(state.epoch), "steps": number(state.step), "micro_batch": number(micro),
            "batch": number(p.promptBatchSize), "seconds": seconds(since: start),
            "stop_patience": number(p.stopPatience), "stop_tolerance": .number(p.stopTolerance),
            "stopped_at_epoch": state.stoppedEarly ? number(state.epoch) : .null,
            "stop_reason": stopReason.map(JSONValue.string) ?? .null,
            "view_budget": p.promptViewBudget.map { number($0) } ?? .null, "step_budget": stepBudget.map { number($0) } ?? .null,
            "planned_steps": number(plannedSteps),
            "stopped_at_budget": .bool(atBudget),
            // Data-parallel tuning (this attempt): units computed here and by helpers, the helpers, and
            // the owner's seconds spent on the database and waiting for helpers' units.
            "units_here": number(owner.unitsHere), "units_helped": number(owner.unitsHelped),
            "units_rescued": number(owner.unitsRescued),
            "helpers": .array(owner.helpers.sorted().map(JSONValue.string)),
            "coordination_seconds": number(owner.coordinationSeconds), "wait_seconds": number(owner.waitSeconds),
            "unit_seconds": number(owner.computeSeconds), "unit_view_seconds": number(owner.viewSeconds),
            "views_computed_ahead": number(source.viewsAhead), "views": number(source.viewsAsked),
            "step_seconds": number(owner.stepSeconds),
            "steps_this_attempt": number(owner.steps),
        ])
        return Tuned(taught: taught, prompts: .tuned(state: state, encoder: encoder, teacherLabels: teacher))
    }
}

// MARK: stage 4

struct LabelStage: NolaStage {
    let name = "label"
    /// Classes kept per image in nola.labels.top_labels.
    static let topCount = 3

    func run(_ tuned: Tuned, _ context: JobContext) throws {
        let taught = tuned.taught, run = tuned.encoded, validated = run.validated
        let start = Date()
        let clip = run.clip.model
        let c = context.classes.count, n = run.readable.count
        var state: PromptTuningState
        let encoder: PromptTunableEncoder
        let teacher: [Int]?
        switch tuned.prompts {
        case .fromJob(let source):
            teacher = nil
            guard let saved = try context.withDatabase({ try PipelineTables.prompts($0, jobID: source) }) else {
                throw JobError.badInput("parameter 'prompts_from_job': job \(source) has no tuned prompts")
            }
            (state, encoder) = try withSafeTensors(saved.safetensors, what: "tuned prompts of job \(source)") { file in
                guard let shape = file.shape(of: PromptTuningState.promptsName), shape.count == 2 else {
                    throw JobError.badInput("tuned prompts of job \(source): no 2-D \(PromptTuningState.promptsName)")
                }
                if let hash = file.metadata["clip_weights_sha256"], hash != run.clip.identity.weightsSHA256 {
                    throw JobError.badInput("tuned prompts of job \(source) belong to CLIP \(file.metadata["clip_model"] ?? "?") (weights \(hash.prefix(12))…), this job uses \(run.clip.identity.name) (weights \(run.clip.identity.weightsSHA256.prefix(12))…)")
                }
                let encoder = promptTunableEncoder(clip, promptCount: shape[0]).encoder
                if let classes = file.metadata["classes"],
                   let names = try? JSONDecoder().decode([String].self, from: Data(classes.utf8)), names != context.classes {
                    throw JobError.badInput("tuned prompts of job \(source) are for classes \(names), this job has \(context.classes)")
                }
                return (try PromptTuningState(resultsSafeTensors: file, encoder: encoder), encoder)
            }
            guard state.head.shape[0] == c else {
                throw JobError.badInput("tuned prompts of job \(source) have a head for \(state.head.shape[0]) classes, this job has \(c)")
            }
        case .tuned(let tunedState, let tunedEncoder, let teacherLabels):
            state = tunedState
            encoder = tunedEncoder
            teacher = teacherLabels
        }

        // Incremental (only_new): the labels these prompts already gave to the same content, by SHA-256.
        var reusable: [String: Results.ReusableLabel] = [:]
        if validated.onlyNew, let source = validated.promptsFromJob {
            reusable = try context.withDatabase { try Results.reusableLabels($0, promptsJob: source) }
        }
        let classIndex = Dictionary(context.classes.enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        // Readable indices (into run.readable) to label here, and those whose earlier row is copied.
        var toCompute: [Int] = [], toCopy: [Int] = []
        for k in 0..<n {
            if let hit = reusable[run.images[run.readable[k]].sha256], classIndex[hit.label] != nil { toCopy.append(k) } else { toCompute.append(k) }
        }
        let m = toCompute.count

        // The tuned model on the weak view of every readable image labelled here, in shards that any worker
        // may compute (docs/scale-out.md): each reads the tuned prompts, LayerNorms and head from the database.
        // (`encoder` checked them against this CLIP; a shard builds its own from the blob.)
        _ = encoder
        let sharded = try ShardComputation.runStage(
            context, stage: name, paths: toCompute.map { run.images[run.readable[$0]].path }, clipFolder: validated.clipFolder,
            dinoFolder: nil, modelKeys: [run.clip.identity.key], blob: state.resultsSafeTensors(metadata: [:]))
        let probabilities = sharded.results.flatMap { FloatBytes.decode($0.result ?? []) }
        guard probabilities.count == m * c else {
            throw JobError.transient("the label shards of job \(context.jobID) hold \(probabilities.count) probabilities, not \(m) × \(c)")
        }
        try context.reportProgress(stage: name, done: m, total: m)
        // Signals and abstention of the images labelled here (toCompute order).
        let signals = toCompute.enumerated().map { j, k in
            LabelSignals(probabilities: probabilities[(j * c)..<((j + 1) * c)], count: min(c, LabelStage.topCount),
                         zeroShot: taught.zeroShotLabels[k], teacher: teacher?[k])
        }
        let rule = AbstentionRule(run.parameters)
        var abstentions: [String?] = Array(repeating: nil, count: m)
        var byReason: [AbstentionRule.Reason: Int] = [:]
        for j in 0..<m {
            guard let (reasons, text) = rule.judge(signals[j], zeroShot: taught.zeroShotLabels[toCompute[j]], names: context.classes) else { continue }
            abstentions[j] = text
            for r in reasons { byReason[r, default: 0] += 1 }
        }
        // Every readable image's label, confidence, zero-shot label and abstention, in run.readable order;
        // copied rows keep what the earlier job wrote (signals included).
        var labels = [Int](repeating: 0, count: n), confidences = [Float](repeating: 0, count: n)
        var abstained = [Bool](repeating: false, count: n)
        var zeroShot = taught.zeroShotLabels
        var computedAt: [Int: Int] = [:]
        for (j, k) in toCompute.enumerated() {
            labels[k] = signals[j].label
            confidences[k] = signals[j].confidence
            abstained[k] = abstentions[j] != nil
            computedAt[k] = j
        }
        for k in toCopy {
            let hit = reusable[run.images[run.readable[k]].sha256]!
            labels[k] = classIndex[hit.label]!
            confidences[k] = Float(hit.confidence)
            if let z = hit.zeroShotLabel.flatMap({ classIndex[$0] }) { zeroShot[k] = z }
        }

        // One row per image of the job.
        var position: [Int: Int] = [:]
        for (k, i) in run.readable.enumerated() { position[i] = k }
        let copied = Set(toCopy.map { run.readable[$0] })
        var records: [LabelRecord] = []
        for (i, image) in run.images.enumerated() where !copied.contains(i) {
            if let k = position[i] {
                let j = computedAt[k]!, s = signals[j]
                records.append(LabelRecord(path: image.path, label: abstentions[j] == nil ? context.classes[s.label] : nil,
                                           abstained: abstentions[j], confidence: s.confidence,
                                           zeroShotLabel: context.classes[taught.zeroShotLabels[k]],
                                           zeroShotConfidence: min(1, max(0, taught.zeroShotConfidences[k])),
                                           topLabels: s.top.map { context.classes[$0] }, topProbabilities: s.probabilities,
                                           margin: s.margin, teacherLabel: s.teacher.map { context.classes[$0] }, agreement: s.agreement))
            } else {
                records.append(LabelRecord(path: image.path, unreadable: run.unreadable[image.path] ?? "unreadable"))
            }
        }
        for chunk in stride(from: 0, to: records.count, by: 500).map({ Array(records[$0..<min(records.count, $0 + 500)]) }) {
            try context.write { try Results.insertLabels($0, context.job, chunk) }
        }
        if let source = validated.promptsFromJob, !toCopy.isEmpty {
            let paths = toCopy.map { run.images[run.readable[$0]].path }
            for chunk in stride(from: 0, to: paths.count, by: 5000).map({ Array(paths[$0..<min(paths.count, $0 + 5000)]) }) {
                let written = try context.withDatabase { try Results.copyLabels($0, context.job, promptsJob: source, paths: chunk) }
                if written < chunk.count {
                    try context.write { try JobStore.isOwned($0, context.job) }
                    throw JobError.transient("the label rows of job \(source) (or of a job labelling with its prompts) changed while they were copied")
                }
            }
        }

        var backbone: [String: JSONValue] = ["clip": run.clip.identity.json]
        if let dino = run.dino { backbone["dino"] = dino.identity.json }
        if validated.promptsFromJob == nil {
            let classesJSON = String(decoding: try JSONEncoder().encode(context.classes), as: UTF8.self)
            let blob = state.resultsSafeTensors(metadata: [
                "clip_model": run.clip.identity.name, "clip_weights_sha256": run.clip.identity.weightsSHA256,
                "dino_model": run.dino?.identity.name ?? "", "dino_weights_sha256": run.dino?.identity.weightsSHA256 ?? "",
                "parameters": validated.parametersJSON, "classes": classesJSON, "job_id": String(context.jobID),
            ])
            var shapes: [String: JSONValue] = [:]
            for t in state.learnedTensors() { shapes[t.name] = .array(t.shape.map { .number(Double($0)) }) }
            let parameters = (try? JSONDecoder().decode(JSONValue.self, from: Data(validated.parametersJSON.utf8))) ?? .object([:])
            try context.write {
                try Results.savePrompts($0, context.job, safetensors: blob, shapes: .object(shapes),
                                        backbone: .object(backbone), parameters: parameters)
            }
            try context.write { try PipelineTables.deleteCheckpoint($0, context.job) }
        }
        // The label rows are written: the shards' probabilities and the stored blob are no longer needed.
        try context.write { try ShardStore.clearResults($0, context.job, stage: name) }

        // labels_per_class counts the labels written (abstentions are not labels).
        var counts: [String: JSONValue] = [:]
        for (k, name) in context.classes.enumerated() {
            counts[name] = number((0..<n).filter { labels[$0] == k && !abstained[$0] }.count)
        }
        let kept = (0..<n).filter { !abstained[$0] }
        var reasons: [String: JSONValue] = [:]
        for r in AbstentionRule.Reason.allCases { reasons[r.rawValue] = number(byReason[r] ?? 0) }
        var metrics: [String: JSONValue] = [
            "labelled": number(n), "computed": number(m), "copied": number(toCopy.count), "only_new": .bool(validated.onlyNew),
            "unreadable": number(run.unreadable.count), "labels_per_class": .object(counts),
            "mean_confidence": number(confidences.isEmpty ? 0 : Double(confidences.reduce(0, +)) / Double(confidences.count)),
            "mean_margin": number(m == 0 ? 0 : Double(signals.map(\.margin).reduce(0, +)) / Double(m)),
            "agreement_with_zero_shot": number(accuracy(predicted: labels, truth: zeroShot)),
            "agreement_all": number(m == 0 ? 0 : Double(signals.filter(\.agreement).count) / Double(m)),
            "abstained": number(n - kept.count), "abstained_by_reason": .object(reasons),
            "coverage": number(n == 0 ? 0 : Double(kept.count) / Double(n)),
            "images_per_second": number(Double(n) / max(1e-9, Date().timeIntervalSince(start))), "seconds": seconds(since: start),
            "shards": number(sharded.results.count), "shards_by_worker": .object(sharded.workers.mapValues { number($0) }),
        ]
        if let teacher { metrics["agreement_with_teacher"] = number(accuracy(predicted: labels, truth: teacher)) }
        if let truth = run.truth {
            metrics["accuracy_final"] = number(accuracy(predicted: labels, truth: truth))
            metrics["accuracy_zero_shot"] = number(accuracy(predicted: zeroShot, truth: truth))
            if let stage2 = taught.stage2 {
                metrics["accuracy_alignment_module"] = number(accuracy(predicted: stage2.teacherLabels, truth: truth))
            }
            // The accuracy of the labels written, when the job abstains on some (null when it abstains on all).
            if rule.isActive {
                metrics["accuracy_labelled"] = kept.isEmpty ? .null
                    : number(accuracy(predicted: kept.map { labels[$0] }, truth: kept.map { truth[$0] }))
            }
        }
        try context.recordEvent(stage: name, kind: "metrics", metrics: metrics)
    }
}
