import Foundation
import Kernels

/// Reads the tensors a model expects from a checkpoint, checking each shape, and at the end
/// that nothing is left over: missing, misshapen or extra tensors throw `CheckpointError` naming them.
struct WeightReader {
    /// nil: random weights of the requested shapes (benchmarks with full-size models, no checkpoint).
    let source: TensorSource?
    /// Prepended to every requested name (e.g. "vit." when a ViTModel was saved inside a task model).
    let prefix: String
    private(set) var used: Set<String> = []

    private var random = SplitMix64(seed: 0x6E6F6C6164)

    init(_ source: TensorSource?, prefix: String = "") {
        self.source = source
        self.prefix = prefix
    }

    mutating func tensor(_ name: String, _ shape: [Int]) throws -> Buffer {
        let full = prefix + name
        guard let source else {
            // random: norm weights and layer scales 1, everything else uniform ±1/√(last dim)
            let count = shape.reduce(1, *)
            if shape.count == 1 && ((name.contains("norm") && name.hasSuffix(".weight")) || name.hasSuffix("lambda1")) {
                return Buffer([Float](repeating: 1, count: count))
            }
            let bound = 1 / Float(shape.last ?? 1).squareRoot()
            return Buffer((0..<count).map { _ in Float.random(in: -bound...bound, using: &random) })
        }
        guard let found = source.shape(of: full) else { throw CheckpointError.missingTensor(source.displayName(full)) }
        // a scalar may be stored as shape [] or [1]
        let same = found == shape || (found.reduce(1, *) == 1 && shape.reduce(1, *) == 1 && found.count <= 1 && shape.count <= 1)
        guard same else { throw CheckpointError.shapeMismatch(name: source.displayName(full), expected: shape, found: found) }
        used.insert(full)
        return Buffer(try source.floats(full))
    }

    mutating func layerNorm(_ name: String, _ c: Int, eps: Float) throws -> LayerNorm {
        LayerNorm(weight: try tensor(name + ".weight", [c]), bias: try tensor(name + ".bias", [c]), eps: eps)
    }

    mutating func linear(_ name: String, in inFeatures: Int, out outFeatures: Int, bias: Bool = true) throws -> Linear {
        Linear(weight: try tensor(name + ".weight", [outFeatures, inFeatures]),
               bias: bias ? try tensor(name + ".bias", [outFeatures]) : nil,
               inFeatures: inFeatures, outFeatures: outFeatures)
    }

    /// q, k, v projections (each (D,D) + bias) packed into one (3D,D) linear.
    mutating func packedQKV(q: String, k: String, v: String, d: Int) throws -> Linear {
        let parts = try [q, k, v].map { try linear($0, in: d, out: d) }
        let weight = Buffer(count: 3 * d * d), bias = Buffer(count: 3 * d)
        for (i, p) in parts.enumerated() {
            (weight.data + i * d * d).update(from: p.weight.data, count: d * d)
            (bias.data + i * d).update(from: p.bias!.data, count: d)
        }
        return Linear(weight: weight, bias: bias, inFeatures: d, outFeatures: 3 * d)
    }

    /// Throws `unexpectedTensor` for any checkpoint tensor that was not read and is not in `ignoring`
    /// (names without the prefix; buffers such as position_ids that some checkpoints carry).
    func finish(ignoring: Set<String> = []) throws {
        guard let source else { return }
        for name in source.tensorNames.sorted() where !used.contains(name) {
            let bare = name.hasPrefix(prefix) ? String(name.dropFirst(prefix.count)) : name
            if !ignoring.contains(bare) { throw CheckpointError.unexpectedTensor(name) }
        }
    }
}

/// A small fast generator for random benchmark weights (SystemRandomNumberGenerator is a syscall per draw).
public struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
}

/// Typed access to `config.json` values, with the transformers defaults for absent keys.
/// Errors name the key with its sub-config ("vision_config.patch_size") and the value as written.
struct ConfigReader {
    let object: [String: Any]
    let file: String
    /// "" at the top level, "vision_config." inside that sub-config.
    var prefix = ""

    /// The largest size a config may give. Far above any real model (vocabularies of 256k, images of a
    /// few thousand pixels), low enough that the products of sizes computed before any tensor is read
    /// (grid², hidden_size · mlp_ratio) cannot overflow and trap.
    static let maximumSize = 1 << 24

    func bad(_ reason: String) -> CheckpointError { .badConfig(file: file, reason: reason) }

    /// A positive integer up to `maximumSize`; 0, negatives, fractions and strings are refused.
    func int(_ key: String, _ fallback: Int) throws -> Int {
        guard let value = object[key] else { return fallback }
        guard let n = value as? NSNumber, n.doubleValue.rounded() == n.doubleValue,
              n.doubleValue >= 1, n.doubleValue <= Double(Self.maximumSize) else {
            throw bad("\(prefix)\(key) is \(configText(value)), not an integer from 1 to \(Self.maximumSize)")
        }
        return n.intValue
    }

    func float(_ key: String, _ fallback: Float) throws -> Float {
        guard let value = object[key] else { return fallback }
        guard let n = value as? NSNumber, n.doubleValue.isFinite else {
            throw bad("\(prefix)\(key) is \(configText(value)), not a number")
        }
        return n.floatValue
    }

    func activation(_ key: String, _ fallback: Activation) throws -> Activation {
        guard let value = object[key] else { return fallback }
        guard let name = value as? String, let act = Activation(huggingFace: name) else {
            throw bad("\(prefix)\(key) \(configText(value)) is not supported (gelu, quick_gelu)")
        }
        return act
    }

    func sub(_ key: String) throws -> ConfigReader {
        guard let value = object[key] else { return ConfigReader(object: [:], file: file, prefix: prefix + key + ".") }
        guard let sub = value as? [String: Any] else { throw bad("\(prefix)\(key) is not an object") }
        return ConfigReader(object: sub, file: file, prefix: prefix + key + ".")
    }

    func string(_ key: String) -> String? { object[key] as? String }

    /// hidden_size divisible by num_attention_heads, as every model here requires.
    func checkHeads(_ d: Int, _ h: Int) throws {
        if d % h != 0 { throw bad("\(prefix)hidden_size \(d) not divisible by \(prefix)num_attention_heads \(h)") }
    }

    /// The images are RGB: a patch embedding over another number of channels would read past each image.
    func checkRGB(_ channels: Int) throws {
        if channels != 3 { throw bad("\(prefix)num_channels is \(channels); only RGB images (3 channels) are supported") }
    }
}

/// A config value as the file writes it: numbers plainly, strings quoted, anything else as JSON.
func configText(_ value: Any) -> String {
    if let s = value as? String { return jsonQuoted(s) }
    if value is NSNull { return "null" }
    if let n = value as? NSNumber {
        let d = n.doubleValue
        return d.rounded() == d && abs(d) < 9e18 ? String(n.int64Value) : String(d)
    }
    if JSONSerialization.isValidJSONObject(value),
       let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .fragmentsAllowed]) {
        return String(decoding: data, as: UTF8.self)
    }
    return "\(value)"
}

func openConfig(_ folder: URL) throws -> ConfigReader {
    ConfigReader(object: try readConfig(folder: folder), file: folder.appendingPathComponent("config.json").path)
}
