/// A named collection of tensors read from a checkpoint, converted to Float32 on access.
/// Implemented by the safetensors reader and the `pytorch_model.bin` (zip + pickle) reader.
public protocol TensorSource {
    /// Every tensor name in the checkpoint, in no particular order.
    var tensorNames: [String] { get }
    /// The shape of `name`, or nil when the checkpoint has no such tensor.
    func shape(of name: String) -> [Int]?
    /// The tensor's values as Float32 in row-major order (F16 and BF16 converted).
    /// Throws `CheckpointError.missingTensor` when absent.
    func floats(_ name: String) throws -> [Float]
    /// How to name `name` in messages (a source that renames tensors gives the name in the file).
    func displayName(_ name: String) -> String
}

extension TensorSource {
    public func displayName(_ name: String) -> String { name }
}

/// Everything that can be wrong with a model folder. Descriptions name the file or tensor.
public enum CheckpointError: Error, CustomStringConvertible, Equatable {
    case missingFile(String)
    case unreadable(file: String, reason: String)
    case missingTensor(String)
    case unexpectedTensor(String)
    case shapeMismatch(name: String, expected: [Int], found: [Int])
    case unsupportedDType(name: String, dtype: String)
    case badConfig(file: String, reason: String)

    public var description: String {
        switch self {
        case .missingFile(let path): return "missing file: \(path)"
        case .unreadable(let file, let reason): return "cannot read \(file): \(reason)"
        case .missingTensor(let name): return "checkpoint has no tensor '\(name)'"
        case .unexpectedTensor(let name): return "checkpoint has an unexpected tensor '\(name)'"
        case .shapeMismatch(let name, let expected, let found):
            return "tensor '\(name)' has shape \(found), expected \(expected)"
        case .unsupportedDType(let name, let dtype): return "tensor '\(name)' has unsupported dtype \(dtype)"
        case .badConfig(let file, let reason): return "bad model config \(file): \(reason)"
        }
    }
}
