import Foundation

/// The weights of a Hugging Face model folder: `model.safetensors` if present, else `pytorch_model.bin`.
/// Throws `CheckpointError.missingFile` naming both when neither exists.
public func openCheckpoint(folder: URL) throws -> TensorSource {
    let safetensors = folder.appendingPathComponent("model.safetensors")
    if FileManager.default.fileExists(atPath: safetensors.path) {
        return try SafeTensorsFile(url: safetensors)
    }
    let torch = folder.appendingPathComponent("pytorch_model.bin")
    if FileManager.default.fileExists(atPath: torch.path) {
        return try TorchCheckpointFile(url: torch)
    }
    throw CheckpointError.missingFile("\(safetensors.path) or \(torch.path)")
}

/// A model folder's `config.json` as a JSON object; model types interpret the keys.
public func readConfig(folder: URL) throws -> [String: Any] {
    try readJSONObject(folder.appendingPathComponent("config.json"))
}

/// A JSON file holding an object. Missing file → `missingFile`; anything else wrong → `badConfig`.
func readJSONObject(_ url: URL) throws -> [String: Any] {
    guard FileManager.default.fileExists(atPath: url.path) else { throw CheckpointError.missingFile(url.path) }
    let data: Data
    do {
        data = try Data(contentsOf: url)
    } catch {
        throw CheckpointError.unreadable(file: url.path, reason: "\(error.localizedDescription)")
    }
    let json: Any
    do {
        json = try JSONSerialization.jsonObject(with: data, options: [])
    } catch {
        throw CheckpointError.badConfig(file: url.path, reason: "not valid JSON")
    }
    guard let object = json as? [String: Any] else {
        throw CheckpointError.badConfig(file: url.path, reason: "top level is not a JSON object")
    }
    return object
}
