import Foundation

// Stage 3: prompt tuning of CLIP's image encoder (reference NoLA.py: prompt_embeddings after the CLS
// token, after ln_pre; trained: prompts, every vision LayerNorm, the linear head cde_adapter; teacher:
// argmax of the alignment module on DINO features of the weak view; student: head logits on a strong view;
// label-smoothing cross-entropy; AdamW with weight decay on everything whose name has no "bias").

/// A named tensor (row-major), the unit of checkpoints and results blobs.
public struct NamedTensor: Equatable, Sendable {
    public var name: String
    public var shape: [Int]
    public var values: [Float]
    public init(name: String, shape: [Int], values: [Float]) {
        precondition(shape.reduce(1, *) == values.count, "\(name): shape \(shape) does not hold \(values.count) values")
        self.name = name
        self.shape = shape
        self.values = values
    }
}

/// The encoder side of prompt tuning, implemented by the Models layer's CLIP vision tower.
/// features = visual_projection(post_layernorm(encoder(insert_after_cls(pre_layrnorm(embeddings(pixels)), prompts))[:, 0]))
/// (projected, not normalised: the head reads them as the reference's `cde_adapter` does).
public protocol PromptTunableEncoder {
    /// W: the vision tower's hidden size (width of a prompt token).
    var hiddenSize: Int { get }
    /// E: size of the features the head reads (projection_dim).
    var featureSize: Int { get }
    /// Activation bytes one image needs in `trainingStep` (sizes micro-batches from a memory budget).
    var trainingBytesPerImage: Int { get }
    /// Every LayerNorm tensor of the vision tower with its pretrained value, in a fixed order, named by
    /// Hugging Face keys ("vision_model.pre_layrnorm.weight", ...).
    func initialLayerNorms() -> [NamedTensor]
    /// Prompted features of `batch` images (pixels (B, 3, H, W)) with these prompts (P, W) and LayerNorm
    /// tensors; then `lossGradient(features (B, E))` returns dFeatures (B, E), which is back-propagated:
    /// gradients are ADDED into promptGradient (P, W) and layerNormGradients (same order as layerNorms).
    /// Frozen layers get input gradients only.
    func trainingStep(pixels: [Float], batch: Int, prompts: [Float], layerNorms: [NamedTensor],
                      lossGradient: ([Float]) -> [Float],
                      promptGradient: inout [Float], layerNormGradients: inout [[Float]]) throws
    /// Prompted features (B, E), no gradients (stage 4).
    func features(pixels: [Float], batch: Int, prompts: [Float], layerNorms: [NamedTensor]) throws -> [Float]
}

/// Everything prompt tuning learns and needs to resume: prompts, LayerNorms, head, AdamW moments, and
/// where it stands (epoch, batch within it, optimizer step, partial epoch metrics).
public struct PromptTuningState: Equatable, Sendable {
    public static let promptsName = "prompt_embeddings"
    public static let headName = "head.weight"

    /// (P, W) named `prompt_embeddings`.
    public var prompts: NamedTensor
    /// The vision tower's LayerNorm tensors (HF names), in the encoder's order.
    public var layerNorms: [NamedTensor]
    /// (C, E) named `head.weight`: the linear head (no bias), initialised from the class vectors.
    public var head: NamedTensor
    /// AdamW moments, one per tensor of `trainable` order.
    public var moments: [AdamMoments]
    /// AdamW steps taken (logical batches).
    public var step = 0
    /// Completed epochs.
    public var epoch = 0
    /// Logical batches completed in epoch `epoch`.
    public var batchInEpoch = 0
    /// Sums over the images of the current epoch so far (for its metrics after a resume).
    public var epochLossSum = 0.0
    public var epochAgreements = 0
    public var epochImages = 0
    /// Sum over the current epoch's strong views of the student's top softmax probability.
    public var epochConfidenceSum = 0.0
    /// The label-free stopping rule (`PromptStopRule`): the last completed epoch's agreement and mean
    /// confidence, how many epochs in a row changed both by less than the tolerance, and whether the rule
    /// has stopped tuning (a resumed job that finds it set trains no further).
    public var previousAgreement: Double?
    public var previousConfidence: Double?
    public var stableEpochs = 0
    public var stoppedEarly = false

    /// Initial state: prompts U(±sqrt(6/(3·16·16 + W))) from the job seed (the reference's bound, with its
    /// fixed 16×16 patch), the encoder's LayerNorms, the head = classifier (C, E). promptCount 0: an
    /// encoder without prompt tokens (an MCi tower, `MCiPromptEncoder`), whose prompts are (0, W).
    public init(encoder: PromptTunableEncoder, classifier: [Float], promptCount: Int, seed: UInt64) {
        let w = encoder.hiddenSize, e = encoder.featureSize
        precondition(classifier.count % e == 0 && promptCount >= 0)
        var random = SeededRandom(seed: seed, stream: "prompt init")
        let bound = Float((6.0 / Double(3 * 16 * 16 + w)).squareRoot())
        let prompts = (0..<(promptCount * w)).map { _ in random.uniform(-bound, bound) }
        self.init(prompts: NamedTensor(name: Self.promptsName, shape: [promptCount, w], values: prompts),
                  layerNorms: encoder.initialLayerNorms(),
                  head: NamedTensor(name: Self.headName, shape: [classifier.count / e, e], values: classifier))
    }

    public init(prompts: NamedTensor, layerNorms: [NamedTensor], head: NamedTensor) {
        self.prompts = prompts
        self.layerNorms = layerNorms
        self.head = head
        moments = ([prompts] + layerNorms + [head]).map { AdamMoments(count: $0.values.count) }
    }

    /// prompts, layerNorms..., head: the order of `moments`.
    public var trainable: [NamedTensor] { [prompts] + layerNorms + [head] }

    /// The reference's no-decay rule (`no_decay = ['bias', ...]` matched as substrings of the name).
    public static func decays(_ name: String) -> Bool { !name.contains("bias") }

    /// The learned tensors only (the results blob: prompts, LayerNorms, head).
    public func learnedTensors() -> [NamedTensor] { trainable }

    /// Everything, for a checkpoint: the learned tensors, their moments as "<name>.exp_avg" /
    /// "<name>.exp_avg_sq", and the position as string metadata.
    public func checkpoint() -> (tensors: [NamedTensor], metadata: [String: String]) {
        var tensors = trainable
        for (t, m) in zip(trainable, moments) {
            tensors.append(NamedTensor(name: t.name + ".exp_avg", shape: t.shape, values: m.m))
            tensors.append(NamedTensor(name: t.name + ".exp_avg_sq", shape: t.shape, values: m.v))
        }
        let metadata = [
            "format": "nolad-prompt-tuning-1", "step": String(step), "epoch": String(epoch),
            "batch_in_epoch": String(batchInEpoch), "epoch_loss_sum": String(epochLossSum),
            "epoch_agreements": String(epochAgreements), "epoch_images": String(epochImages),
            "epoch_confidence_sum": String(epochConfidenceSum),
            "previous_agreement": previousAgreement.map { String($0) } ?? "",
            "previous_confidence": previousConfidence.map { String($0) } ?? "",
            "stable_epochs": String(stableEpochs), "stopped_early": stoppedEarly ? "true" : "false",
            "layer_norms": layerNorms.map(\.name).joined(separator: ","),
        ]
        return (tensors, metadata)
    }

    /// Restores `checkpoint()`; a missing or misshapen tensor or bad metadata is a `.badState` error.
    public init(checkpoint tensors: [NamedTensor], metadata: [String: String]) throws {
        guard metadata["format"] == "nolad-prompt-tuning-1" else {
            throw MethodError(.badState, "format", "not a nolad prompt-tuning checkpoint")
        }
        let byName = Dictionary(tensors.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        func tensor(_ name: String) throws -> NamedTensor {
            guard let t = byName[name] else { throw MethodError(.badState, name, "missing") }
            return t
        }
        func number<T: LosslessStringConvertible>(_ key: String, _: T.Type) throws -> T {
            guard let s = metadata[key], let v = T(s) else { throw MethodError(.badState, key, "missing or not a number") }
            return v
        }
        /// A position counter: a negative one would index before the epoch's first batch on resume.
        func count(_ key: String) throws -> Int {
            let v = try number(key, Int.self)
            guard v >= 0 else { throw MethodError(.badState, key, "\(v) is negative") }
            return v
        }
        func matrix(_ name: String) throws -> NamedTensor {
            let t = try tensor(name)
            guard t.shape.count == 2 else { throw MethodError(.badState, name, "shape \(t.shape), expected two dimensions") }
            return t
        }
        let names = (metadata["layer_norms"] ?? "").split(separator: ",").map(String.init)
        self.init(prompts: try matrix(Self.promptsName), layerNorms: try names.map(tensor), head: try matrix(Self.headName))
        moments = try trainable.map { t in
            let m = try tensor(t.name + ".exp_avg"), v = try tensor(t.name + ".exp_avg_sq")
            guard m.shape == t.shape, v.shape == t.shape else {
                throw MethodError(.badState, t.name, "moments have shape \(m.shape)/\(v.shape), tensor \(t.shape)")
            }
            return AdamMoments(m: m.values, v: v.values)
        }
        step = try count("step")
        epoch = try count("epoch")
        batchInEpoch = try count("batch_in_epoch")
        epochLossSum = try number("epoch_loss_sum", Double.self)
        guard epochLossSum.isFinite, epochLossSum >= 0 else {
            throw MethodError(.badState, "epoch_loss_sum", "\(epochLossSum) is not a finite loss")
        }
        epochAgreements = try count("epoch_agreements")
        epochImages = try count("epoch_images")
        // The stopping rule's keys came later: a checkpoint without them has never used the rule.
        /// A fraction in [0, 1], or nil when empty or absent.
        func fraction(_ key: String) throws -> Double? {
            guard let s = metadata[key], !s.isEmpty else { return nil }
            guard let v = Double(s), v.isFinite, v >= 0, v <= 1 else { throw MethodError(.badState, key, "\(s) is not a fraction") }
            return v
        }
        if metadata["epoch_confidence_sum"] != nil {
            epochConfidenceSum = try number("epoch_confidence_sum", Double.self)
            guard epochConfidenceSum.isFinite, epochConfidenceSum >= 0 else {
                throw MethodError(.badState, "epoch_confidence_sum", "\(epochConfidenceSum) is not a finite sum of confidences")
            }
        }
        previousAgreement = try fraction("previous_agreement")
        previousConfidence = try fraction("previous_confidence")
        if metadata["stable_epochs"] != nil { stableEpochs = try count("stable_epochs") }
        switch metadata["stopped_early"] {
        case nil, "false": stoppedEarly = false
        case "true": stoppedEarly = true
        case let other?: throw MethodError(.badState, "stopped_early", "\(other) is not true or false")
        }
    }
}

/// What prompt tuning reports after each optimizer step.
public struct PromptTuningProgress: Sendable {
    public var epoch: Int, epochs: Int
    public var batchInEpoch: Int, batchesPerEpoch: Int
    /// Images processed since this call of `run` started (for rates).
    public var imagesThisRun: Int
    /// Fraction of the whole stage done, in [0, 1].
    public var fraction: Double { Double(epoch * batchesPerEpoch + batchInEpoch) / Double(max(1, epochs * batchesPerEpoch)) }
}

/// One finished epoch's metrics: mean label-smoothing loss, teacher–student agreement (fraction of
/// strong views whose student argmax equals the teacher label) and the student's mean confidence (top
/// softmax probability on the strong views); with the stopping rule on, how many epochs in a row were
/// stable and, when the rule stopped tuning after this epoch, why.
public struct PromptTuningEpoch: Sendable {
    public var epoch: Int
    public var meanLoss: Double
    public var agreement: Double
    public var meanConfidence: Double = 0
    public var stableEpochs = 0
    public var stopReason: String?
}

/// The label-free stopping rule (docs/pipeline.md, "Stopping early"): an epoch is *stable* when both its
/// teacher–student agreement and its mean confidence differ from the previous epoch's by less than
/// `tolerance` (absolute, both are fractions); tuning stops after `patience` stable epochs in a row, or at
/// the job's epoch count. Patience 0 = off (a fixed number of epochs, as the reference). It reads only the
/// epoch metrics kept in `PromptTuningState`, so a job resumed from a checkpoint decides as an
/// uninterrupted one.
public struct PromptStopRule: Equatable, Sendable {
    public var patience: Int
    public var tolerance: Double
    public init(patience: Int = 0, tolerance: Double = 0.01) {
        self.patience = patience
        self.tolerance = tolerance
    }
    public static let off = PromptStopRule()

    /// Updates the rule's part of `state` with a finished epoch's metrics; returns the reason when tuning stops.
    func observe(agreement: Double, confidence: Double, state: inout PromptTuningState) -> String? {
        guard patience > 0 else { return nil }
        if let a = state.previousAgreement, let m = state.previousConfidence,
           abs(agreement - a) < tolerance, abs(confidence - m) < tolerance {
            state.stableEpochs += 1
        } else {
            state.stableEpochs = 0
        }
        state.previousAgreement = agreement
        state.previousConfidence = confidence
        guard state.stableEpochs >= patience else { return nil }
        state.stoppedEarly = true
        return reason
    }

    /// Why the rule stopped tuning, as the epoch and metrics events say it.
    public var reason: String {
        "teacher-student agreement and mean confidence changed by less than \(tolerance) for \(patience) epoch\(patience == 1 ? "" : "s") in a row"
    }
}

/// Micro-batch size: the images whose activations fit `memoryBudgetBytes`, at least 1, at most the
/// logical batch.
public func promptMicroBatchSize(memoryBudgetBytes: Int, bytesPerImage: Int, logicalBatch: Int) -> Int {
    precondition(bytesPerImage > 0 && logicalBatch > 0)
    return min(logicalBatch, max(1, memoryBudgetBytes / bytesPerImage))
}

/// The logical batches of one epoch over `order`: batches of `batchSize`, the last partial one dropped
/// when there is at least one full batch (dassl's train loader: drop_last when N ≥ batch size).
public func promptBatches(order: [Int], batchSize: Int) -> [ArraySlice<Int>] {
    var batches = stride(from: 0, to: order.count, by: batchSize).map { order[$0..<min(order.count, $0 + batchSize)] }
    if order.count >= batchSize, let last = batches.last, last.count < batchSize { batches.removeLast() }
    return batches
}

/// The seed of image `image`'s strong view in `epoch`: the augmentation sampler draws from it, so a
/// resumed epoch sees exactly the views an uninterrupted one would.
public func strongViewSeed(jobSeed: UInt64, epoch: Int, image: Int) -> UInt64 {
    var random = SeededRandom(seed: jobSeed &+ UInt64(truncatingIfNeeded: epoch) &* 0x9e37_79b9_7f4a_7c15, stream: "strong view", index: image)
    return random.next()
}

/// The micro-batch size of a job that does not set `prompt_micro_batch_size`: a fixed number, so every
/// worker of a job splits its logical batches into the same units (the result must not depend on which
/// workers run it). 16 images need ≈ 0.8 GiB of activations at ViT-B/32 and ≈ 2.8 GiB at ViT-B/16, inside
/// the default `memory_budget_mb` (4096); a worker whose budget is smaller refuses the job with a sentence.
public let defaultPromptMicroBatchSize = 16

/// The units of one optimizer step: the logical batch cut into consecutive micro-batches of
/// `microBatchSize` images (the last one may be smaller). Unit u holds batch[u·m ..< (u+1)·m].
public func promptUnits(batch: [Int], microBatchSize: Int) -> [[Int]] {
    precondition(microBatchSize > 0)
    return stride(from: 0, to: batch.count, by: microBatchSize).map { Array(batch[$0..<min(batch.count, $0 + microBatchSize)]) }
}

/// One optimizer step to compute: its number (1-based, the step AdamW takes after it), epoch, the
/// images of its logical batch, and that batch cut into units.
public struct PromptStepPlan: Equatable, Sendable {
    /// The step this plan computes (`state.step + 1` of the state whose parameters it reads).
    public var step: Int
    public var epoch: Int
    public var batch: [Int]
    public var units: [[Int]]
}

/// What one unit contributes to its step, computed from zero: the gradient of every trained tensor
/// (prompts, LayerNorms..., head: `PromptTuningState.trainable` order, flattened), and the unit's sums of
/// loss, teacher–student agreements and top-probability confidence. The gradient is already divided by
/// the step's logical batch size (the loss is a mean over it), so a step's gradient is the sum of its
/// units' gradients.
public struct PromptUnitResult: Equatable, Sendable {
    public var gradient: [Float]
    public var lossSum: Double
    public var agreements: Int
    public var confidenceSum: Double
    public init(gradient: [Float], lossSum: Double, agreements: Int, confidenceSum: Double) {
        self.gradient = gradient
        self.lossSum = lossSum
        self.agreements = agreements
        self.confidenceSum = confidenceSum
    }

    /// Little-endian bytes: gradient floats, then lossSum, confidenceSum (Float64) and agreements (Int64).
    /// What a worker writes to nola.tuning_units; `init(bytes:count:)` reads it back bit for bit.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 4 * gradient.count + 24)
        out.withUnsafeMutableBytes { raw in
            for (i, v) in gradient.enumerated() { raw.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
            let o = 4 * gradient.count
            raw.storeBytes(of: lossSum.bitPattern.littleEndian, toByteOffset: o, as: UInt64.self)
            raw.storeBytes(of: confidenceSum.bitPattern.littleEndian, toByteOffset: o + 8, as: UInt64.self)
            raw.storeBytes(of: UInt64(bitPattern: Int64(agreements)).littleEndian, toByteOffset: o + 16, as: UInt64.self)
        }
        return out
    }

    /// Reads `bytes` of a unit whose gradient has `count` floats; nil when the length does not match.
    public init?(bytes: [UInt8], count: Int) {
        guard bytes.count == 4 * count + 24 else { return nil }
        var g = [Float](repeating: 0, count: count)
        var loss = 0.0, confidence = 0.0, agree = 0
        bytes.withUnsafeBytes { raw in
            for i in 0..<count { g[i] = Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
            let o = 4 * count
            loss = Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: o, as: UInt64.self)))
            confidence = Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: o + 8, as: UInt64.self)))
            agree = Int(Int64(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: o + 16, as: UInt64.self))))
        }
        self.init(gradient: g, lossSum: loss, agreements: agree, confidenceSum: confidence)
    }
}

extension PromptTuningState {
    /// Floats in a unit's gradient: every trained tensor's values.
    public var gradientCount: Int { trainable.reduce(0) { $0 + $1.values.count } }
}

/// One unit's gradient and sums, from zero: the student at `state`'s parameters on `pixels` (the strong
/// views of `images`, (B, 3, H, W)), against the teacher labels `targets`, with the loss averaged over the
/// step's `logicalBatch` images. It depends only on these inputs (and the machine's arithmetic at the
/// worker's thread count), never on which worker computes it or on other units.
public func promptUnitGradient(encoder: PromptTunableEncoder, state: PromptTuningState, targets: [Int], pixels: [Float],
                               logicalBatch: Int, labelSmoothing: Double) throws -> PromptUnitResult {
    let c = state.head.shape[0], e = state.head.shape[1]
    let b = targets.count
    precondition(b > 0 && logicalBatch >= b && targets.allSatisfy { $0 >= 0 && $0 < c })
    var promptGradient = [Float](repeating: 0, count: state.prompts.values.count)
    var layerNormGradients = state.layerNorms.map { [Float](repeating: 0, count: $0.values.count) }
    var headGradient = [Float](repeating: 0, count: c * e)
    var lossSum = 0.0, agreements = 0, confidenceSum = 0.0
    let head = state.head.values
    try encoder.trainingStep(pixels: pixels, batch: b, prompts: state.prompts.values, layerNorms: state.layerNorms,
                             lossGradient: { features in
        precondition(features.count == b * e)
        // logits (b, C) = features (b, E) · headᵀ
        let logits = linear(features, head, nil, n: b, inFeatures: e, outFeatures: c)
        let predicted = argmaxRows(logits, columns: c).labels
        confidenceSum += topProbabilitySum(logits, columns: c)
        agreements += zip(predicted, targets).filter { $0 == $1 }.count
        var dLogits = [Float](repeating: 0, count: b * c)
        lossSum += smoothedCrossEntropy(logits, targets: targets, classCount: c, smoothing: Float(labelSmoothing),
                                        logicalBatch: logicalBatch, dLogits: &dLogits)
        // dHead (C, E) += dLogitsᵀ · features; dFeatures (b, E) = dLogits · head
        var dFeatures = [Float](repeating: 0, count: b * e)
        dFeatures.withUnsafeMutableBufferPointer { df in
            linearGradients(dLogits, features, head, n: b, inFeatures: e, outFeatures: c,
                            dInp: df.baseAddress!, dWeight: &headGradient, dBias: nil)
        }
        return dFeatures
    }, promptGradient: &promptGradient, layerNormGradients: &layerNormGradients)
    var gradient = promptGradient
    gradient.reserveCapacity(state.gradientCount)
    for g in layerNormGradients { gradient += g }
    gradient += headGradient
    return PromptUnitResult(gradient: gradient, lossSum: lossSum, agreements: agreements, confidenceSum: confidenceSum)
}

/// Σ of the units' results in unit order (element by element, left to right from the first unit), so
/// the same units give the same bits wherever they were computed.
public func sumPromptUnits(_ units: [PromptUnitResult]) -> PromptUnitResult {
    precondition(!units.isEmpty)
    var total = units[0]
    for u in units.dropFirst() {
        precondition(u.gradient.count == total.gradient.count)
        total.gradient.withUnsafeMutableBufferPointer { t in
            u.gradient.withUnsafeBufferPointer { g in for i in 0..<t.count { t[i] += g[i] } }
        }
        total.lossSum += u.lossSum
        total.agreements += u.agreements
        total.confidenceSum += u.confidenceSum
    }
    return total
}

/// The AdamW step over a logical batch whose summed unit results are `total` (state.step += 1).
public func applyPromptStep(state: inout PromptTuningState, total: PromptUnitResult, learningRate: Double, weightDecay: Double) {
    precondition(total.gradient.count == state.gradientCount)
    let decayed = AdamHyperparameters(learningRate: learningRate, weightDecay: weightDecay)
    let plain = AdamHyperparameters(learningRate: learningRate)
    state.step += 1
    let t = state.step
    var offset = 0
    func slice(_ count: Int) -> [Float] {
        defer { offset += count }
        return Array(total.gradient[offset..<offset + count])
    }
    adamStep(parameter: &state.prompts.values, gradient: slice(state.prompts.values.count), moments: &state.moments[0], step: t,
             PromptTuningState.decays(state.prompts.name) ? decayed : plain)
    for i in state.layerNorms.indices {
        adamStep(parameter: &state.layerNorms[i].values, gradient: slice(state.layerNorms[i].values.count),
                 moments: &state.moments[1 + i], step: t, PromptTuningState.decays(state.layerNorms[i].name) ? decayed : plain)
    }
    adamStep(parameter: &state.head.values, gradient: slice(state.head.values.count), moments: &state.moments[state.moments.count - 1],
             step: t, PromptTuningState.decays(state.head.name) ? decayed : plain)
}

/// The plan of the step `state` is at (nil when tuning is complete): the epoch's shuffle seeded by
/// (seed, epoch), its `state.batchInEpoch`-th logical batch, cut into units.
public func promptStepPlan(state: PromptTuningState, imageCount n: Int, epochs: Int, batchSize: Int, microBatchSize: Int,
                           seed: UInt64, order: ((Int) -> [Int])? = nil) -> PromptStepPlan? {
    guard state.epoch < epochs && !state.stoppedEarly && n > 0 else { return nil }
    var random = SeededRandom(seed: seed, stream: "prompt shuffle", index: state.epoch)
    let permutation = order?(state.epoch) ?? random.permutation(n)
    precondition(permutation.count == n)
    let batches = promptBatches(order: permutation, batchSize: batchSize)
    guard state.batchInEpoch < batches.count else { return nil }
    let batch = Array(batches[state.batchInEpoch])
    return PromptStepPlan(step: state.step + 1, epoch: state.epoch, batch: batch, units: promptUnits(batch: batch, microBatchSize: microBatchSize))
}

/// The unit computed after unit `unit` of `plan` when one worker computes them in order: the next unit of
/// the step, or the first of the next step's (the epoch's last batch is followed by the next epoch's
/// first; nil past the last epoch). What to compute strong views for ahead; the stopping rule or the step
/// budget may still end tuning before it.
public func promptUnitAfter(_ unit: Int, of plan: PromptStepPlan, state: PromptTuningState, imageCount n: Int, epochs: Int,
                            batchSize: Int, microBatchSize: Int, seed: UInt64) -> (images: [Int], epoch: Int)? {
    if unit + 1 < plan.units.count { return (plan.units[unit + 1], plan.epoch) }
    var next = state
    next.step += 1
    next.batchInEpoch += 1
    if next.batchInEpoch >= promptBatches(order: Array(0..<n), batchSize: batchSize).count {
        next.epoch += 1
        next.batchInEpoch = 0
    }
    guard let after = promptStepPlan(state: next, imageCount: n, epochs: epochs, batchSize: batchSize,
                                     microBatchSize: microBatchSize, seed: seed), let first = after.units.first else { return nil }
    return (first, after.epoch)
}

/// `runPromptTuning` with the job's parameters (epochs, batch, micro-batch, learning rate, weight decay,
/// label smoothing, seed).
public func runPromptTuning(encoder: PromptTunableEncoder, state: inout PromptTuningState, teacherLabels: [Int],
                            parameters: NolaParameters,
                            strongViews: ([Int], Int) throws -> [Float],
                            viewsAhead: (([Int], Int) -> Void)? = nil,
                            computeUnits: ((PromptStepPlan, PromptTuningState) throws -> [PromptUnitResult])? = nil,
                            shouldStop: () -> Bool = { false },
                            onStep: (PromptTuningProgress, PromptTuningState) throws -> Void = { _, _ in },
                            onEpoch: (PromptTuningEpoch, PromptTuningState) throws -> Void = { _, _ in }) throws {
    try runPromptTuning(encoder: encoder, state: &state, teacherLabels: teacherLabels, epochs: parameters.promptEpochs,
                        batchSize: parameters.promptBatchSize, microBatchSize: parameters.promptMicroBatchSize,
                        learningRate: parameters.promptLearningRate, weightDecay: parameters.promptWeightDecay,
                        labelSmoothing: parameters.labelSmoothing, seed: parameters.seed,
                        stopRule: PromptStopRule(patience: parameters.stopPatience, tolerance: parameters.stopTolerance),
                        stepBudget: parameters.promptStepBudget(imageCount: teacherLabels.count),
                        strongViews: strongViews, viewsAhead: viewsAhead, computeUnits: computeUnits,
                        shouldStop: shouldStop, onStep: onStep, onEpoch: onEpoch)
}

/// Runs (or resumes) prompt tuning until `epochs` epochs are complete, or `stopRule` stops it earlier
/// (`state.stoppedEarly`; a state that has stopped trains no further), or `state.step` reaches
/// `stepBudget` (nil: no cap), which may end it mid-epoch; a state at the budget trains no further.
/// - teacherLabels: the alignment module's label of every image (computed once; weak view is deterministic).
/// - strongViews(indices, epoch): pixels (B, 3, H, W) of one fresh strong view of each image; the sampler
///   should seed from (job seed, epoch, image index) so a resumed epoch sees the same views.
/// - viewsAhead(indices, epoch): told, once a unit's views are in hand, which unit the default
///   `computeUnits` computes next (`promptUnitAfter`), so its views can be computed meanwhile.
/// - computeUnits(plan, state): the results of every unit of the plan, in unit order, each computed by
///   `promptUnitGradient` at `state`'s parameters (data-parallel tuning hands units to other workers
///   here). Default: computed here, one after the other, with `shouldStop` polled before each.
/// - order(epoch): image order of an epoch; default a shuffle seeded by (seed, epoch).
/// - shouldStop: polled before every unit the default `computeUnits` computes (a custom one polls its
///   own); when true, throws `.cancelled` with `state` at the last completed step.
/// - onStep(progress, state): after every optimizer step (save a checkpoint here when due).
/// - onEpoch(metrics, state): after every epoch (save a checkpoint here).
/// A step's gradient is the sum of its units' gradients in unit order (`sumPromptUnits`), so the result
/// depends on the micro-batch size (the job's) but not on who computed the units.
public func runPromptTuning(encoder: PromptTunableEncoder, state: inout PromptTuningState, teacherLabels: [Int],
                            epochs: Int, batchSize: Int, microBatchSize: Int, learningRate: Double,
                            weightDecay: Double, labelSmoothing: Double, seed: UInt64,
                            stopRule: PromptStopRule = .off,
                            stepBudget: Int? = nil,
                            strongViews: ([Int], Int) throws -> [Float],
                            viewsAhead: (([Int], Int) -> Void)? = nil,
                            computeUnits: ((PromptStepPlan, PromptTuningState) throws -> [PromptUnitResult])? = nil,
                            order: ((Int) -> [Int])? = nil,
                            shouldStop: () -> Bool = { false },
                            onStep: (PromptTuningProgress, PromptTuningState) throws -> Void = { _, _ in },
                            onEpoch: (PromptTuningEpoch, PromptTuningState) throws -> Void = { _, _ in }) throws {
    let n = teacherLabels.count
    let c = state.head.shape[0]
    // Bugs: a restored state is checked against the job's CLIP and teacher labels first (TuneStage).
    precondition(state.head.shape[1] == encoder.featureSize && state.prompts.shape[1] == encoder.hiddenSize)
    precondition(batchSize > 0 && microBatchSize > 0 && teacherLabels.allSatisfy { $0 >= 0 && $0 < c })
    guard n > 0 else { throw MethodError(.badInput, "prompt tuning", "no images") }
    var imagesThisRun = 0
    func local(_ plan: PromptStepPlan, _ s: PromptTuningState) throws -> [PromptUnitResult] {
        try plan.units.enumerated().map { u, unit in
            if shouldStop() { throw MethodError(.cancelled, "prompt tuning", "stopped") }
            let pixels = try strongViews(unit, plan.epoch)
            if let viewsAhead, order == nil,
               let next = promptUnitAfter(u, of: plan, state: s, imageCount: n, epochs: epochs, batchSize: batchSize,
                                          microBatchSize: microBatchSize, seed: seed) {
                viewsAhead(next.images, next.epoch)
            }
            return try promptUnitGradient(encoder: encoder, state: s, targets: unit.map { teacherLabels[$0] }, pixels: pixels,
                                          logicalBatch: plan.batch.count, labelSmoothing: labelSmoothing)
        }
    }

    while state.epoch < epochs && !state.stoppedEarly {
        let batchesPerEpoch = promptBatches(order: Array(0..<n), batchSize: batchSize).count
        while let plan = promptStepPlan(state: state, imageCount: n, epochs: epochs, batchSize: batchSize,
                                        microBatchSize: microBatchSize, seed: seed, order: order) {
            // The budget is checked before a step, so a budget met at an epoch's last step still closes that epoch.
            if let budget = stepBudget, state.step >= budget { return }
            let results = try computeUnits.map { try $0(plan, state) } ?? local(plan, state)
            precondition(results.count == plan.units.count)
            let total = sumPromptUnits(results)
            applyPromptStep(state: &state, total: total, learningRate: learningRate, weightDecay: weightDecay)
            state.batchInEpoch += 1
            state.epochLossSum += total.lossSum
            state.epochAgreements += total.agreements
            state.epochConfidenceSum += total.confidenceSum
            state.epochImages += plan.batch.count
            imagesThisRun += plan.batch.count
            try onStep(PromptTuningProgress(epoch: state.epoch, epochs: epochs, batchInEpoch: state.batchInEpoch,
                                            batchesPerEpoch: batchesPerEpoch, imagesThisRun: imagesThisRun), state)
        }
        let images = Double(max(1, state.epochImages))
        var metrics = PromptTuningEpoch(epoch: state.epoch, meanLoss: state.epochLossSum / images,
                                        agreement: Double(state.epochAgreements) / images,
                                        meanConfidence: min(1, state.epochConfidenceSum / images))
        state.epoch += 1
        state.batchInEpoch = 0
        state.epochLossSum = 0
        state.epochAgreements = 0
        state.epochImages = 0
        state.epochConfidenceSum = 0
        metrics.stopReason = stopRule.observe(agreement: metrics.agreement, confidence: metrics.meanConfidence, state: &state)
        metrics.stableEpochs = state.stableEpochs
        try onEpoch(metrics, state)
    }
}

/// Σ over rows of the top softmax probability of `logits` (rows × columns), in Double.
func topProbabilitySum(_ logits: [Float], columns: Int) -> Double {
    var sum = 0.0
    for row in stride(from: 0, to: logits.count, by: columns) {
        let r = logits[row..<row + columns]
        let top = Double(r.max()!)
        var z = 0.0
        for x in r { z += exp(Double(x) - top) }
        sum += 1 / z
    }
    return sum
}
