import Foundation

/// The weights of a Hugging Face model folder, first found of: `model.safetensors`,
/// `model.safetensors.index.json` (shards), `pytorch_model.bin`, `pytorch_model.bin.index.json`.
/// Throws `CheckpointError.missingFile` naming all four when none exists.
public func openCheckpoint(folder: URL) throws -> TensorSource {
    let candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    for name in candidates {
        let url = folder.appendingPathComponent(name)
        guard FileManager.default.fileExists(atPath: url.path) else { continue }
        switch name {
        case "model.safetensors": return try SafeTensorsFile(url: url)
        case "pytorch_model.bin": return try TorchCheckpointFile(url: url)
        default: return try ShardedCheckpoint(index: url)
        }
    }
    throw CheckpointError.missingFile(candidates.map { folder.appendingPathComponent($0).path }.joined(separator: " or "))
}

/// A checkpoint split over several files, as `save_pretrained` writes big models:
/// `<name>.index.json` = {"weight_map": {tensor: shard file name}}; each shard is a safetensors or
/// torch.save file in the same folder, opened once.
public final class ShardedCheckpoint: TensorSource, @unchecked Sendable {
    let shards: [String: TensorSource]
    let shardOfTensor: [String: String]

    public init(index: URL) throws {
        let object = try readJSONObject(index)
        guard let map = object["weight_map"] as? [String: String] else {
            throw CheckpointError.badConfig(file: index.path, reason: "no \"weight_map\" object of tensor → file names")
        }
        let folder = index.deletingLastPathComponent()
        var shards: [String: TensorSource] = [:]
        for file in Set(map.values).sorted() {
            guard !file.contains("/") else { throw CheckpointError.badConfig(file: index.path, reason: "shard '\(file)' is not in the folder") }
            let url = folder.appendingPathComponent(file)
            shards[file] = file.hasSuffix(".safetensors") ? try SafeTensorsFile(url: url) : try TorchCheckpointFile(url: url)
        }
        for (name, file) in map where shards[file]!.shape(of: name) == nil {
            throw CheckpointError.unreadable(file: folder.appendingPathComponent(file).path,
                                             reason: "has no tensor '\(name)', which \(index.lastPathComponent) places there")
        }
        self.shards = shards
        self.shardOfTensor = map
    }

    public var tensorNames: [String] { Array(shardOfTensor.keys) }

    public func shape(of name: String) -> [Int]? {
        shardOfTensor[name].flatMap { shards[$0]!.shape(of: name) }
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let file = shardOfTensor[name] else { throw CheckpointError.missingTensor(name) }
        return try shards[file]!.floats(name)
    }
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
