import Foundation

/// Every job parameter of the NoLA method with the reference's value as default (public NoLA code:
/// `find_k`, `train_taal`, `setup_optim`, `config.yml`). Decoded from the job's parameters JSON with
/// `init(json:)` (unknown key or bad value → `MethodError.badParameter` naming the key) and recorded
/// with the results through `encodedJSON()`. JSON keys are the snake_case names in `Key`.
public struct NolaParameters: Equatable, Sendable {
    /// Prompt-tuning epochs when the job does not say (the reference runs 50). Sized so a 1,000-image,
    /// 10-class job at ViT-B/32 + DINO ViT-B/16 finishes in about an hour on 2 cores: an epoch is
    /// ⌊N/512⌋ logical batches of 512 strong views (the last partial batch is dropped, as the reference's
    /// loader does), i.e. 512 images for N = 1,000. `nolad bench-job` on 2 idle cores (README, "Whole-job
    /// benchmark") measures ≈ 0.21 s per image-step of prompt tuning, ≈ 0.36 s per image for the CLIP + DINO
    /// features and ≈ 0.08 s per image for the labels: ≈ 107 s an epoch, 30 epochs ≈ 53 min + 7.5 min.
    public static let defaultPromptEpochs = 30
    /// The default training budget in strong views (docs/budget.md): 120 full logical batches of 512, what
    /// 30 epochs of a 2,048-image collection see (≈ 3.2 h of prompt tuning on 2 cores at full model size,
    /// 0.19 s per view, docs/costs.md). Collections below 2,560 images run the default 30 epochs in full;
    /// the demo's 50 epochs of 480 images are 24,000 views.
    public static let defaultPromptViewBudget: Int? = 61_440

    // Run
    public var seed: UInt64 = 7777
    // Stage 1
    /// Add the built-in prompt templates to every class's sentences (the reference always does).
    public var templates = true
    // Stage 2: k = max(minK, ⌊kFraction · N / C⌋)
    public var minK = 16
    public var kFraction = 0.2
    public var alignmentEpochs = 50
    public var alignmentLearningRate = 1e-3
    public var alignmentBatchSize = 32
    public var alignmentHiddenSize = 256
    // Stage 3
    public var promptEpochs = NolaParameters.defaultPromptEpochs
    public var promptLearningRate = 0.004
    public var promptWeightDecay = 0.01
    public var promptBatchSize = 512
    /// Images per forward/backward pass: one unit of an optimizer step (data-parallel tuning hands units
    /// to workers). The job's, never the worker's: the result depends on it. JSON null = the default.
    public var promptMicroBatchSize = defaultPromptMicroBatchSize
    public var promptCount = 16
    public var labelSmoothing = 0.1
    /// The strong view's two ColorJitters (brightness/contrast/saturation 0.4, hue 0.1). Off for classes that
    /// are told apart by colour or lightness, which the jitter would teach the student to ignore.
    public var colourJitter = true
    /// The label-free stopping rule (`PromptStopRule`, docs/pipeline.md): stop prompt tuning after this many
    /// epochs in a row whose agreement and mean confidence changed by less than `stopTolerance`; 0 = off
    /// (the default: on the demo it stops well before the 50 epochs that give the best labels).
    public var stopPatience = 0
    public var stopTolerance = 0.01
    /// The training budget (docs/budget.md): prompt tuning sees at most this many strong views (whole
    /// optimizer steps of min(promptBatchSize, N) views each), however many epochs `promptEpochs` asks for,
    /// so its cost stops growing with N × epochs; nil = no cap.
    public var promptViewBudget: Int? = NolaParameters.defaultPromptViewBudget
    // Models: folder names under the configured model root (Hugging Face layout).
    public var clipModel = "clip-vit-base-patch32"
    public var dinoModel = "dino-vitb16"
    // Labels (docs/labels.md): an image gets no class, only the reason, when its final confidence is
    // below `abstainBelow`, its margin below `abstainMarginBelow`, or (with `abstainUnlessAgree`) the
    // final, zero-shot and teacher classes differ. 0, 0, false: every readable image is labelled.
    public var abstainBelow = 0.0
    public var abstainMarginBelow = 0.0
    public var abstainUnlessAgree = false

    public init() {}

    public enum Key: String, CaseIterable, Sendable {
        case seed, templates
        case minK = "min_k"
        case kFraction = "k_fraction"
        case alignmentEpochs = "alignment_epochs"
        case alignmentLearningRate = "alignment_lr"
        case alignmentBatchSize = "alignment_batch_size"
        case alignmentHiddenSize = "alignment_hidden_size"
        case promptEpochs = "prompt_epochs"
        case promptLearningRate = "prompt_lr"
        case promptWeightDecay = "prompt_weight_decay"
        case promptBatchSize = "prompt_batch_size"
        case promptMicroBatchSize = "prompt_micro_batch_size"
        case promptCount = "prompt_count"
        case labelSmoothing = "label_smoothing"
        case colourJitter = "colour_jitter"
        case stopPatience = "stop_patience"
        case stopTolerance = "stop_tolerance"
        case promptViewBudget = "prompt_view_budget"
        case clipModel = "clip_model"
        case dinoModel = "dino_model"
        case abstainBelow = "abstain_below"
        case abstainMarginBelow = "abstain_margin_below"
        case abstainUnlessAgree = "abstain_unless_agree"
    }

    /// The optimizer steps the view budget allows a job of `imageCount` images: ⌊budget / views per step⌋,
    /// a step being min(promptBatchSize, imageCount) strong views; nil = no cap.
    public func promptStepBudget(imageCount: Int) -> Int? {
        promptViewBudget.map { $0 / max(1, min(promptBatchSize, imageCount)) }
    }

    /// k of the reference's `find_k`: max(minK, ⌊kFraction · imageCount / classCount⌋).
    public func k(imageCount: Int, classCount: Int) -> Int {
        precondition(classCount > 0)
        let k = Int((Double(imageCount) / Double(classCount) * kFraction).rounded(.down))
        return max(minK, k)
    }

    /// Decodes the job's parameters JSON object (empty data or `null` = all defaults).
    public init(json data: Data) throws {
        self = try JobParameters(json: data, daemonKeys: false).method
    }

    fileprivate init(object: [String: JSONValue], daemonKeys: Bool) throws {
        self.init()
        for name in object.keys.sorted() {
            if daemonKeys && ParameterSpec.daemonKeys.contains(where: { $0.name == name }) { continue }
            guard let key = Key(rawValue: name) else {
                let daemonOnly = Set(ParameterSpec.daemonKeys.map(\.name))
                let known = ParameterSpec.all.map(\.name).filter { daemonKeys || !daemonOnly.contains($0) }
                throw MethodError(.badParameter, name, "unknown parameter (known: \(known.joined(separator: ", ")))")
            }
            guard let value = object[name] else { continue }
            try set(key, value)
        }
    }

    private mutating func set(_ key: Key, _ value: JSONValue) throws {
        if let refusal = key.spec.refusal(value) { throw MethodError(.badParameter, key.rawValue, refusal) }
        // The spec has checked type and range; the switch only stores.
        func int() -> Int { if case .integer(let v) = value { return v } else { return 0 } }
        func double() -> Double {
            switch value {
            case .integer(let v): return Double(v)
            case .number(let v): return v
            default: return 0
            }
        }
        func bool() -> Bool { if case .bool(let v) = value { return v } else { return false } }
        func string() -> String { if case .string(let v) = value { return v } else { return "" } }
        switch key {
        case .seed: seed = UInt64(int())
        case .templates: templates = bool()
        case .minK: minK = int()
        case .kFraction: kFraction = double()
        case .alignmentEpochs: alignmentEpochs = int()
        case .alignmentLearningRate: alignmentLearningRate = double()
        case .alignmentBatchSize: alignmentBatchSize = int()
        case .alignmentHiddenSize: alignmentHiddenSize = int()
        case .promptEpochs: promptEpochs = int()
        case .promptLearningRate: promptLearningRate = double()
        case .promptWeightDecay: promptWeightDecay = double()
        case .promptBatchSize: promptBatchSize = int()
        case .promptMicroBatchSize: promptMicroBatchSize = value == .null ? defaultPromptMicroBatchSize : int()
        case .promptCount: promptCount = int()
        case .labelSmoothing: labelSmoothing = double()
        case .colourJitter: colourJitter = bool()
        case .stopPatience: stopPatience = int()
        case .stopTolerance: stopTolerance = double()
        case .promptViewBudget: promptViewBudget = value == .null ? nil : int()
        case .clipModel: clipModel = string()
        case .dinoModel: dinoModel = string()
        case .abstainBelow: abstainBelow = double()
        case .abstainMarginBelow: abstainMarginBelow = double()
        case .abstainUnlessAgree: abstainUnlessAgree = bool()
        }
    }

    /// Every parameter (defaults included) as a JSON object with sorted keys, to record with the results.
    /// `init(json: p.encodedJSON())` gives back `p`.
    public func encodedJSON() -> Data {
        var object: [String: Any] = [
            Key.seed.rawValue: NSNumber(value: seed),
            Key.templates.rawValue: templates,
            Key.minK.rawValue: minK,
            Key.kFraction.rawValue: kFraction,
            Key.alignmentEpochs.rawValue: alignmentEpochs,
            Key.alignmentLearningRate.rawValue: alignmentLearningRate,
            Key.alignmentBatchSize.rawValue: alignmentBatchSize,
            Key.alignmentHiddenSize.rawValue: alignmentHiddenSize,
            Key.promptEpochs.rawValue: promptEpochs,
            Key.promptLearningRate.rawValue: promptLearningRate,
            Key.promptWeightDecay.rawValue: promptWeightDecay,
            Key.promptBatchSize.rawValue: promptBatchSize,
            Key.promptCount.rawValue: promptCount,
            Key.labelSmoothing.rawValue: labelSmoothing,
            Key.colourJitter.rawValue: colourJitter,
            Key.stopPatience.rawValue: stopPatience,
            Key.stopTolerance.rawValue: stopTolerance,
            Key.clipModel.rawValue: clipModel,
            Key.dinoModel.rawValue: dinoModel,
            Key.abstainBelow.rawValue: abstainBelow,
            Key.abstainMarginBelow.rawValue: abstainMarginBelow,
            Key.abstainUnlessAgree.rawValue: abstainUnlessAgree,
        ]
        object[Key.promptMicroBatchSize.rawValue] = promptMicroBatchSize
        object[Key.promptViewBudget.rawValue] = promptViewBudget.map { $0 as Any } ?? NSNull()
        return try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
    }
}

/// A job's `parameters` column as the pipeline reads it: the method's parameters, the keys the job set
/// itself, and the daemon's own `prompts_from_job` (an earlier job whose tuned prompts label this one),
/// `only_new` (with it: label only what that job has not) and `threads` (the job's thread count,
/// docs/threading.md).
public struct JobParameters: Equatable, Sendable {
    public var method = NolaParameters()
    public var given: Set<String> = []
    public var promptsFromJob: Int64?
    /// With `promptsFromJob` only: label only the images whose content (SHA-256) that job has not
    /// labelled, and copy its label rows for the rest (docs/incremental.md).
    public var onlyNew = false
    /// The threads the job asks for (nil: the daemon's `threads`).
    public var threads: Int?

    public init(json data: Data) throws {
        try self.init(json: data, daemonKeys: true)
    }

    init(json data: Data, daemonKeys: Bool) throws {
        if data.allSatisfy({ $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }) { return }
        let value = try JSONValue.parse(data, code: .badParameter, subject: "parameters")
        if case .null = value { return }
        guard case .object(let object) = value else {
            throw MethodError(.badParameter, "parameters", "must be a JSON object, got \(value.jsonText)")
        }
        method = try NolaParameters(object: object, daemonKeys: daemonKeys)
        given = Set(object.keys)
        if daemonKeys, let value = object[ParameterSpec.promptsFromJob.name] {
            if let refusal = ParameterSpec.promptsFromJob.refusal(value) {
                throw MethodError(.badParameter, ParameterSpec.promptsFromJob.name, refusal)
            }
            if case .integer(let id) = value { promptsFromJob = Int64(id) }
        }
        if daemonKeys, let value = object[ParameterSpec.onlyNew.name] {
            if let refusal = ParameterSpec.onlyNew.refusal(value) {
                throw MethodError(.badParameter, ParameterSpec.onlyNew.name, refusal)
            }
            if case .bool(let b) = value { onlyNew = b }
            if onlyNew && promptsFromJob == nil {
                throw MethodError(.badParameter, ParameterSpec.onlyNew.name, ParameterSpec.onlyNewWithoutPrompts)
            }
        }
        if daemonKeys, let value = object[ParameterSpec.threads.name] {
            if let refusal = ParameterSpec.threads.refusal(value) {
                throw MethodError(.badParameter, ParameterSpec.threads.name, refusal)
            }
            if case .integer(let n) = value { threads = n }
        }
    }
}
