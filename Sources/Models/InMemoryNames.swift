import Foundation

/// transformers ≥ 5 keeps a ViT's and a DINOv2's tensors under other names in memory than in the
/// checkpoints `save_pretrained` writes (it converts on save and load). A `pytorch_model.bin` written by
/// `torch.save(model.state_dict())` therefore carries the in-memory names:
///   ViT:    layers.N.attention.{q,k,v,o}_proj, layers.N.layernorm_{before,after}, layers.N.mlp.fc{1,2}
///   DINOv2: encoder.layer.N.attention.{q,k,v,o}_proj (the rest as in checkpoints)
/// This source shows such a file under the checkpoint names the models read. The table is built once;
/// files with checkpoint names pass through unchanged.
final class TransformersInMemoryNames: TensorSource, @unchecked Sendable {
    let base: TensorSource
    /// checkpoint name → name in the file
    let table: [String: String]

    /// `base` itself when none of its names is an in-memory one.
    static func wrap(_ base: TensorSource) -> TensorSource {
        var table: [String: String] = [:]
        for name in base.tensorNames {
            if let legacy = checkpointName(name) { table[legacy] = name }
        }
        return table.isEmpty ? base : TransformersInMemoryNames(base, table: table)
    }

    private init(_ base: TensorSource, table: [String: String]) {
        self.base = base
        self.table = table
    }

    /// The checkpoint name of an in-memory name, nil for a name that is already one. A "vit." or
    /// "dinov2." prefix (a backbone inside a task model) is kept.
    static func checkpointName(_ name: String) -> String? {
        var parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        var start = 0
        if parts.first == "vit" || parts.first == "dinov2" { start = 1 }
        let projections = ["q_proj": "attention.attention.query", "k_proj": "attention.attention.key",
                           "v_proj": "attention.attention.value", "o_proj": "attention.output.dense"]
        // ViT: layers.N.<rest>
        if parts.count >= start + 3, parts[start] == "layers", Int(parts[start + 1]) != nil {
            let layer = "encoder.layer.\(parts[start + 1])"
            let rest = parts[(start + 2)...]
            let renamed: String?
            switch (rest.first, rest.dropFirst().first) {
            case ("attention"?, let p?) where projections[p] != nil && rest.count == 3:
                renamed = projections[p]! + "." + rest.last!
            case ("mlp"?, "fc1"?) where rest.count == 3: renamed = "intermediate.dense." + rest.last!
            case ("mlp"?, "fc2"?) where rest.count == 3: renamed = "output.dense." + rest.last!
            case ("layernorm_before"?, _), ("layernorm_after"?, _): renamed = rest.joined(separator: ".")
            default: renamed = nil
            }
            guard let renamed else { return nil }
            return (parts[..<start] + [layer, renamed]).joined(separator: ".")
        }
        // DINOv2: encoder.layer.N.attention.{q,k,v,o}_proj.<weight|bias>
        if parts.count == start + 6, parts[start] == "encoder", parts[start + 1] == "layer", Int(parts[start + 2]) != nil,
           parts[start + 3] == "attention", let p = projections[parts[start + 4]] {
            parts.replaceSubrange((start + 3)...(start + 4), with: [p])
            return parts.joined(separator: ".")
        }
        return nil
    }

    var tensorNames: [String] {
        let renamed = Set(table.values)
        return Array(table.keys) + base.tensorNames.filter { !renamed.contains($0) }
    }

    func shape(of name: String) -> [Int]? { base.shape(of: table[name] ?? name) }
    func floats(_ name: String) throws -> [Float] { try base.floats(table[name] ?? name) }
    func displayName(_ name: String) -> String { table[name] ?? name }
}
