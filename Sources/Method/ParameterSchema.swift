import Foundation

/// One job parameter as both checkers see it: `NolaParameters` here, and `nola.check_parameters` at
/// INSERT, which reads the same rows from the view `nola.parameter_schema` (migration 0004). A database
/// test compares `ParameterSpec.all` with that view row by row, and the two refusal texts for the same
/// bad values, so the schema is written twice but cannot drift.
public struct ParameterSpec: Equatable, Sendable {
    public enum Kind: String, Sendable {
        case integer, number, boolean
        /// A folder name under the configured model root: no '/', no NUL, not starting with '.', 1–200 characters.
        case folder
    }

    public let name: String
    public let kind: Kind
    /// Bounds of integers and numbers; nil = unbounded on that side.
    public let minimum: Double?
    public let maximum: Double?
    public let exclusiveMinimum: Bool
    public let exclusiveMaximum: Bool
    /// JSON null is accepted and means "not set" (as if the key were left out).
    public let nullable: Bool

    init(_ name: String, _ kind: Kind, min: Double? = nil, max: Double? = nil, exclusiveMin: Bool = false,
         exclusiveMax: Bool = false, nullable: Bool = false) {
        self.name = name
        self.kind = kind
        self.minimum = min
        self.maximum = max
        self.exclusiveMinimum = exclusiveMin
        self.exclusiveMaximum = exclusiveMax
        self.nullable = nullable
    }

    /// Every parameter a job may carry: the method's (`NolaParameters.Key`) and the daemon's own
    /// `prompts_from_job` and `only_new` (read by the pipeline's validate stage) and `threads` (read by the executor).
    public static let all: [ParameterSpec] = NolaParameters.Key.allCases.map(\.spec) + daemonKeys

    /// The parameters the daemon reads itself; `NolaParameters` does not see them.
    public static let daemonKeys = [promptsFromJob, onlyNew, threads]

    public static let promptsFromJob = ParameterSpec("prompts_from_job", .integer, min: 1)
    /// Incremental labelling (docs/incremental.md); true only together with `prompts_from_job`.
    public static let onlyNew = ParameterSpec("only_new", .boolean)
    /// The refusal of `only_new: true` without `prompts_from_job` (the same words as `nola.check_parameters`).
    public static let onlyNewWithoutPrompts = "is true only with prompts_from_job (the earlier job whose labels and tuned prompts it reuses)"
    /// Threads for the job's numeric work, at most the daemon's `threads` (docs/threading.md).
    public static let threads = ParameterSpec("threads", .integer, min: 1, max: 1024)

    /// What values are allowed, as the refusal states it: "an integer from 1 to 1000000",
    /// "a number greater than 0 and at most 1", "true or false". `nola.parameter_allowed` in SQL builds
    /// the same words.
    public var allowed: String {
        func text(_ x: Double) -> String {
            x == x.rounded() && abs(x) < 1e15 ? String(Int64(x)) : String(x)
        }
        var words: String
        switch kind {
        case .boolean: words = "true or false"
        case .folder: words = "a plain folder name (no '/', not starting with '.')"
        case .integer, .number:
            words = kind == .integer ? "an integer" : "a number"
            switch (minimum, maximum) {
            case let (lo?, hi?) where !exclusiveMinimum && !exclusiveMaximum:
                words += " from \(text(lo)) to \(text(hi))"
            default:
                var bounds: [String] = []
                if let lo = minimum { bounds.append((exclusiveMinimum ? "greater than " : "at least ") + text(lo)) }
                if let hi = maximum { bounds.append((exclusiveMaximum ? "below " : "at most ") + text(hi)) }
                if !bounds.isEmpty { words += " " + bounds.joined(separator: " and ") }
            }
        }
        return nullable ? words + ", or null" : words
    }

    /// Why `value` is refused, or nil when it is allowed: "must be an integer from 0 to 10000, got 2.5".
    func refusal(_ value: JSONValue) -> String? {
        let ok: Bool
        switch (kind, value) {
        case (_, .null): ok = nullable
        case (.boolean, .bool): ok = true
        case (.folder, .string(let s)):
            ok = !s.isEmpty && s.count <= 200 && !s.contains("/") && !s.contains("\0") && !s.hasPrefix(".")
        case (.integer, .integer(let i)): ok = inRange(Double(i))
        case (.number, .integer(let i)): ok = inRange(Double(i))
        case (.number, .number(let d)): ok = d.isFinite && inRange(d)
        default: ok = false
        }
        return ok ? nil : "must be \(allowed), got \(value.jsonText)"
    }

    private func inRange(_ x: Double) -> Bool {
        if let lo = minimum, exclusiveMinimum ? !(x > lo) : !(x >= lo) { return false }
        if let hi = maximum, exclusiveMaximum ? !(x < hi) : !(x <= hi) { return false }
        return true
    }
}

extension NolaParameters.Key {
    /// The allowed values of each parameter (the reference's defaults are in `NolaParameters`).
    public var spec: ParameterSpec {
        switch self {
        case .seed: return ParameterSpec(rawValue, .integer, min: 0)
        case .templates, .colourJitter: return ParameterSpec(rawValue, .boolean)
        case .stopPatience: return ParameterSpec(rawValue, .integer, min: 0, max: 10_000)
        case .stopTolerance: return ParameterSpec(rawValue, .number, min: 0, max: 1, exclusiveMin: true)
        // null: no cap (prompt_epochs alone decides).
        case .promptViewBudget: return ParameterSpec(rawValue, .integer, min: 1, max: 1_000_000_000_000, nullable: true)
        case .minK: return ParameterSpec(rawValue, .integer, min: 1, max: 1_000_000)
        case .kFraction: return ParameterSpec(rawValue, .number, min: 0, max: 1)
        case .alignmentEpochs, .promptEpochs: return ParameterSpec(rawValue, .integer, min: 0, max: 10_000)
        case .alignmentLearningRate, .promptLearningRate: return ParameterSpec(rawValue, .number, min: 0, max: 1, exclusiveMin: true)
        case .alignmentBatchSize, .promptBatchSize: return ParameterSpec(rawValue, .integer, min: 1, max: 1_000_000)
        case .alignmentHiddenSize: return ParameterSpec(rawValue, .integer, min: 1, max: 65_536)
        case .promptWeightDecay: return ParameterSpec(rawValue, .number, min: 0, max: 1)
        // null: derived from the worker's memory budget (what the recorded parameters say when unset).
        case .promptMicroBatchSize: return ParameterSpec(rawValue, .integer, min: 1, max: 1_000_000, nullable: true)
        case .promptCount: return ParameterSpec(rawValue, .integer, min: 1, max: 1024)
        case .labelSmoothing: return ParameterSpec(rawValue, .number, min: 0, max: 1, exclusiveMax: true)
        case .clipModel, .dinoModel: return ParameterSpec(rawValue, .folder)
        case .abstainBelow, .abstainMarginBelow: return ParameterSpec(rawValue, .number, min: 0, max: 1)
        case .abstainUnlessAgree: return ParameterSpec(rawValue, .boolean)
        }
    }
}
