// The method layer's one error type. Bugs are preconditions; bad input and environment failures throw this.

public struct MethodError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Code: String, Sendable {
        /// A job parameter is unknown, of the wrong type or out of range (`subject` names the key).
        case badParameter
        /// The descriptions JSON is malformed or names classes the job does not have.
        case badDescriptions
        /// The LLM endpoint could not be reached, timed out or answered with an HTTP error.
        case llmRequestFailed
        /// The LLM endpoint answered, but not with a usable chat completion.
        case llmBadReply
        /// Inputs to a stage are inconsistent (no images, a class without any candidate, NaN features...).
        case badInput
        /// A saved training state cannot be restored (missing tensor, wrong shape, other job).
        case badState
        /// The caller asked the stage to stop.
        case cancelled
    }

    public var code: Code
    /// What the error is about: a parameter key, a class name, a tensor name, a URL without credentials.
    public var subject: String
    public var reason: String

    public init(_ code: Code, _ subject: String, _ reason: String) {
        self.code = code
        self.subject = subject
        self.reason = reason
    }

    public var description: String {
        switch code {
        case .badParameter: return "parameter '\(subject)': \(reason)"
        case .badDescriptions: return "descriptions for '\(subject)': \(reason)"
        case .llmRequestFailed: return "LLM request to \(subject) failed: \(reason)"
        case .llmBadReply: return "LLM reply from \(subject) unusable: \(reason)"
        case .badInput: return "\(subject): \(reason)"
        case .badState: return "training state '\(subject)': \(reason)"
        case .cancelled: return "\(subject) cancelled"
        }
    }
}
