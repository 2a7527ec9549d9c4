import Foundation
import Method
import Models
import Queue

/// A model folder with its identity: the folder's name and the SHA-256 of its weights file. Features,
/// prompts and checkpoints are tied to this identity.
struct ModelIdentity: Equatable, Sendable {
    let folder: URL
    let weightsSHA256: String
    var name: String { folder.lastPathComponent }
    /// "<folder name>@<first 16 hex of the weights hash>", the feature cache's model key.
    var key: String { name + "@" + weightsSHA256.prefix(16) }
    var json: JSONValue { ["folder": .string(name), "weights_sha256": .string(weightsSHA256)] }

    /// Hashes the folder's weights: the file's SHA-256, or for a sharded checkpoint the SHA-256 of the
    /// lines "<file name> <SHA-256>" of its index and shards.
    static func of(folder: URL) throws -> ModelIdentity {
        let files = weightsFiles(folder: folder)
        guard !files.isEmpty else {
            let names = OpenCLIPFolder.isOpenCLIP(folder) ? OpenCLIPFolder.weightFiles
                : ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
            throw JobError.badInput("model folder \(folder.path) has no \(names.joined(separator: " or ")) (or its shard index cannot be read)")
        }
        if files.count == 1 {
            return ModelIdentity(folder: folder, weightsSHA256: try CollectionAccess.inspectAnyFile(files[0].path))
        }
        var lines = ""
        for file in files { lines += "\(file.lastPathComponent) \(try CollectionAccess.inspectAnyFile(file.path))\n" }
        var hasher = SHA256()
        hasher.update(Array(lines.utf8))
        return ModelIdentity(folder: folder, weightsSHA256: SHA256.hex(hasher.finalize()))
    }
}

extension CollectionAccess {
    /// SHA-256 (hex) of any file's bytes.
    static func inspectAnyFile(_ path: String) throws -> String {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw JobError.badInput("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var hasher = SHA256()
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw JobError.transient("cannot read \(path): \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
        return SHA256.hex(hasher.finalize())
    }
}

/// Loaded CLIP (with its tokenizer) and DINO models, kept between jobs: weights are immutable and
/// shared; a folder is reloaded when its weights file changes (size or modification time).
final class ModelCache: @unchecked Sendable {
    static let shared = ModelCache()

    struct CLIPEntry {
        let identity: ModelIdentity
        /// CLIP (transformers' or open_clip's ViT) or MobileCLIP (an open_clip folder with a MobileCLIP tower).
        let model: any ImageTextModel
        let tokenizer: CLIPTokenizer
    }
    struct DINOEntry {
        let identity: ModelIdentity
        let model: ViTModel
    }

    private let lock = NSLock()
    private var clips: [String: (stamp: String, entry: CLIPEntry)] = [:]
    private var dinos: [String: (stamp: String, entry: DINOEntry)] = [:]

    private func stamp(_ folder: URL) -> String {
        (["model.safetensors", "pytorch_model.bin"] + OpenCLIPFolder.weightFiles).map { name -> String in
            var st = stat()
            guard stat(folder.appendingPathComponent(name).path, &st) == 0 else { return "-" }
            return "\(st.st_size):\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
        }.joined(separator: "|")
    }

    func clip(_ folder: URL) throws -> CLIPEntry {
        let s = stamp(folder)
        if let hit = lock.withLock({ clips[folder.path] }), hit.stamp == s { return hit.entry }
        let identity = try ModelIdentity.of(folder: folder)
        let entry: CLIPEntry
        do {
            let type = try modelType(folder: folder)
            guard type == "clip" else {
                throw JobError.badInput("\(folder.path)/config.json: model_type is \(type ?? "(none)"), not clip")
            }
            let model = try loadImageTextModel(folder: folder), tokenizer = try CLIPTokenizer(folder: folder)
            try tokenizer.checkFits(model.textConfig, source: folder.path)
            entry = CLIPEntry(identity: identity, model: model, tokenizer: tokenizer)
        } catch let error as CheckpointError {
            throw JobError.badInput("CLIP model \(folder.path): \(error)")
        }
        lock.withLock { clips = [folder.path: (s, entry)] }
        return entry
    }

    func dino(_ folder: URL) throws -> DINOEntry {
        let s = stamp(folder)
        if let hit = lock.withLock({ dinos[folder.path] }), hit.stamp == s { return hit.entry }
        let identity = try ModelIdentity.of(folder: folder)
        let entry: DINOEntry
        do {
            entry = DINOEntry(identity: identity, model: try ViTModel(folder: folder))
        } catch let error as CheckpointError {
            throw JobError.badInput("DINO model \(folder.path): \(error)")
        }
        lock.withLock { dinos = [folder.path: (s, entry)] }
        return entry
    }
}
