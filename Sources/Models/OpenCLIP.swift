import Foundation
import Kernels

/// open_clip's hub layout of a CLIP model: `open_clip_config.json` ({"model_cfg": …, "preprocess_cfg": …})
/// with `open_clip_model.safetensors` or `open_clip_pytorch_model.bin` (open_clip's parameter names).
/// Here: ViT image towers with open_clip's standard text tower (MobileCLIP's timm towers load as
/// `MobileCLIPModel`, MobileCLIP/MobileCLIP.swift); the config is mapped once onto
/// `CLIPConfig` and the parameter names once onto transformers' `CLIPModel` names, so the same forward
/// passes (and prompt tuning) run on both layouts.
public enum OpenCLIPFolder {
    public static let configFile = "open_clip_config.json"
    public static let weightFiles = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]

    /// True for a folder in open_clip's layout without a transformers `config.json` (a folder with
    /// both is read as transformers').
    public static func isOpenCLIP(_ folder: URL) -> Bool {
        let fm = FileManager.default
        return fm.fileExists(atPath: folder.appendingPathComponent(configFile).path)
            && !fm.fileExists(atPath: folder.appendingPathComponent("config.json").path)
    }

    /// The weights file of an open_clip folder, or `missingFile` naming both.
    public static func weightsFile(_ folder: URL) throws -> URL {
        for name in weightFiles {
            let url = folder.appendingPathComponent(name)
            if FileManager.default.fileExists(atPath: url.path) { return url }
        }
        throw CheckpointError.missingFile(weightFiles.map { folder.appendingPathComponent($0).path }.joined(separator: " or "))
    }

    /// The model's config and its weights under transformers' names.
    public static func load(_ folder: URL) throws -> (config: CLIPConfig, weights: TensorSource) {
        let parsed = try config(folder)
        let url = try weightsFile(folder)
        let file: TensorSource = url.pathExtension == "safetensors" ? try SafeTensorsFile(url: url) : try TorchCheckpointFile(url: url)
        return (parsed.config, OpenCLIPNames(file, visionLayers: parsed.config.visionConfig.numHiddenLayers,
                                             textLayers: parsed.config.textConfig.numHiddenLayers, textPrefix: parsed.customText ? "text." : ""))
    }

    /// Reads `open_clip_config.json`: `model_cfg` becomes a `CLIPConfig`; everything that would change
    /// the architecture away from open_clip's plain ViT + text transformer is refused by name.
    public static func config(_ folder: URL) throws -> (config: CLIPConfig, customText: Bool) {
        let (top, m, url) = try sections(folder)
        let v = try m.sub("vision_cfg"), t = try m.sub("text_cfg")
        func refuse(_ what: String) -> CheckpointError { .badConfig(file: url.path, reason: what) }

        if let name = timmModelName(v) {
            if MobileCLIPTowerKind(timmModelName: name) != nil {
                throw refuse("the image tower is MobileCLIP's \(name), not open_clip's ViT; the folder loads as a MobileCLIP model")
            }
            throw refuse("the image tower is a timm model (\(name)); only open_clip's ViT image tower and MobileCLIP's (\(MobileCLIPTowerKind.names)) are supported")
        }
        if v.object["layers"] is [Any] {
            throw refuse("the image tower is a ResNet (vision_cfg.layers is a list); only open_clip's ViT image tower is supported")
        }
        try checkTextAndHeads(m, t, file: url.path)
        // Options of open_clip's ViT tower that nolad's forward pass does not have, with their defaults.
        let unsupported: [(String, Any)] = [
            ("ls_init_value", NSNull()), ("attentional_pool", false),
            ("no_ln_pre", false), ("pos_embed_type", "learnable"),
            ("final_ln_after_pool", false), ("pool_type", "tok"),
            ("act_kwargs", NSNull()), ("norm_kwargs", NSNull()),
            ("block_type", NSNull()), ("qk_norm", false),
            ("scaled_cosine_attn", false), ("scale_heads", false),
            ("scale_attn_inner", false), ("scale_attn", false),
            ("scale_fc", false),
        ]
        try refuseOptions(v, section: "vision_cfg", unsupported, file: url.path)

        let act: Activation = try bool(m, "quick_gelu", file: url.path) ? .quickGelu : .gelu
        var c = CLIPConfig()
        c.projectionDim = try m.int("embed_dim", 512)
        let width = try v.int("width", 768), headWidth = try v.int("head_width", 64)
        guard width % headWidth == 0 else { throw refuse("vision_cfg.width \(width) is not divisible by head_width \(headWidth)") }
        c.visionConfig.hiddenSize = width
        c.visionConfig.numAttentionHeads = width / headWidth
        c.visionConfig.numHiddenLayers = try v.int("layers", 12)
        c.visionConfig.intermediateSize = try mlpWidth(v, width, section: "vision_cfg", file: url.path)
        c.visionConfig.imageSize = try imageSide(v, "image_size", 224, file: url.path)
        c.visionConfig.patchSize = try imageSide(v, "patch_size", 16, file: url.path)
        c.visionConfig.hiddenAct = act
        c.textConfig = try textConfig(t, activation: act, file: url.path)
        try m.checkHeads(c.visionConfig.hiddenSize, c.visionConfig.numAttentionHeads)
        if c.visionConfig.imageSize % c.visionConfig.patchSize != 0 {
            throw refuse("vision_cfg.image_size \(c.visionConfig.imageSize) is not divisible by patch_size \(c.visionConfig.patchSize)")
        }
        try checkPreprocess(top, file: url.path)
        return (c, try bool(m, "custom_text", file: url.path))
    }

    /// The file's top level, its `model_cfg` (the top level itself in older files) and the file's URL.
    static func sections(_ folder: URL) throws -> (top: ConfigReader, model: ConfigReader, url: URL) {
        let url = folder.appendingPathComponent(configFile)
        let top = ConfigReader(object: try readJSONObject(url), file: url.path)
        return (top, top.object["model_cfg"] != nil ? try top.sub("model_cfg") : top, url)
    }

    /// vision_cfg.timm_model_name, nil when absent or null.
    static func timmModelName(_ v: ConfigReader) -> String? {
        guard let value = v.object["timm_model_name"], !(value is NSNull) else { return nil }
        return value as? String ?? "\(value)"
    }

    /// What every open_clip model nolad loads shares: open_clip's text transformer with CLIP's tokenizer,
    /// no CoCa decoder, no SigLIP head.
    static func checkTextAndHeads(_ m: ConfigReader, _ t: ConfigReader, file: String) throws {
        func refuse(_ what: String) -> CheckpointError { .badConfig(file: file, reason: what) }
        if t.object["hf_model_name"].map({ !($0 is NSNull) }) == true {
            throw refuse("the text tower is a Hugging Face model (\(t.object["hf_model_name"]!)); only open_clip's standard text transformer is supported")
        }
        if t.object["hf_tokenizer_name"].map({ !($0 is NSNull) }) == true {
            throw refuse("the tokenizer is \(t.object["hf_tokenizer_name"]!); only CLIP's BPE tokenizer is supported")
        }
        if m.object["multimodal_cfg"] != nil { throw refuse("multimodal_cfg (a CoCa-style decoder) is not supported") }
        if m.object["init_logit_bias"].map({ !($0 is NSNull) }) == true {
            throw refuse("init_logit_bias (a SigLIP-style sigmoid head) is not supported")
        }
    }

    /// Refuses, by name, any option of `section` whose value is not the listed default.
    static func refuseOptions(_ reader: ConfigReader, section: String, _ options: [(String, Any)], file: String) throws {
        for (key, standard) in options {
            guard let value = reader.object[key] else { continue }
            if jsonText(value) == jsonText(standard) { continue }
            throw CheckpointError.badConfig(file: file, reason: "\(section).\(key) \(jsonText(value)) is not supported (nolad runs open_clip's plain ViT and text transformer; this option must be \(jsonText(standard)))")
        }
    }

    /// open_clip's `text_cfg` as a `CLIPTextConfig`: pooled at the highest id, causal unless `no_causal_mask`.
    static func textConfig(_ t: ConfigReader, activation act: Activation, file: String) throws -> CLIPTextConfig {
        try refuseOptions(t, section: "text_cfg", [
            ("ls_init_value", NSNull()), ("embed_cls", false),
            ("use_pad_mask", false), ("final_ln_after_pool", false),
            ("pool_type", "argmax"), ("proj_bias", false),
            ("proj_type", "linear"), ("act_kwargs", NSNull()),
            ("norm_kwargs", NSNull()), ("block_type", NSNull()),
            ("qk_norm", false), ("scaled_cosine_attn", false),
            ("scale_heads", false), ("scale_attn_inner", false),
            ("scale_attn", false), ("scale_fc", false),
            ("tokenizer_mode", NSNull()), ("tokenizer_kwargs", NSNull()),
        ], file: file)
        var c = CLIPTextConfig()
        let textWidth = try t.int("width", 512)
        c.hiddenSize = textWidth
        c.numAttentionHeads = try t.int("heads", 8)
        c.numHiddenLayers = try t.int("layers", 12)
        c.intermediateSize = try mlpWidth(t, textWidth, section: "text_cfg", file: file)
        c.vocabSize = try t.int("vocab_size", 49408)
        c.maxPositionEmbeddings = try t.int("context_length", 77)
        c.hiddenAct = act
        // open_clip pools the text at the highest token id (its end-of-text token is the last id).
        c.pooling = .highestID
        c.causal = !(try bool(t, "no_causal_mask", file: file))
        try t.checkHeads(c.hiddenSize, c.numAttentionHeads)
        if c.maxPositionEmbeddings < 2 {
            throw CheckpointError.badConfig(file: file, reason: "text_cfg.context_length \(c.maxPositionEmbeddings) leaves no room for the start and end tokens (at least 2)")
        }
        return c
    }

    static func bool(_ r: ConfigReader, _ key: String, file: String) throws -> Bool {
        guard let value = r.object[key] else { return false }
        guard let b = value as? Bool else { throw CheckpointError.badConfig(file: file, reason: "\(key) is not true or false") }
        return b
    }

    /// open_clip's image size may be an int or a [height, width] pair; only square inputs are supported.
    static func imageSide(_ r: ConfigReader, _ key: String, _ fallback: Int, file: String) throws -> Int {
        if let pair = r.object[key] as? [NSNumber] {
            guard pair.count == 2, pair[0] == pair[1], pair[0].intValue > 0 else {
                throw CheckpointError.badConfig(file: file, reason: "vision_cfg.\(key) \(pair) is not square; only square inputs are supported")
            }
            return pair[0].intValue
        }
        return try r.int(key, fallback)
    }

    static func mlpWidth(_ r: ConfigReader, _ width: Int, section: String, file: String) throws -> Int {
        let ratio = Double(try r.float("mlp_ratio", 4))
        let hidden = Double(width) * ratio
        guard hidden >= 1, hidden == hidden.rounded() else {
            throw CheckpointError.badConfig(file: file, reason: "\(section).mlp_ratio \(ratio) × width \(width) is not a whole number of units")
        }
        return Int(hidden)
    }

    /// `preprocess_cfg` must describe the view nolad gives CLIP models: bicubic resize of the shorter
    /// side, centre crop, OpenAI's mean and std.
    private static func checkPreprocess(_ top: ConfigReader, file: String) throws {
        let p = try top.sub("preprocess_cfg")
        func close(_ key: String, _ expected: [Float]) throws {
            guard let value = p.object[key] else { return }
            guard let numbers = value as? [NSNumber], numbers.count == 3,
                  zip(numbers, expected).allSatisfy({ abs($0.floatValue - $1) < 1e-6 }) else {
                throw CheckpointError.badConfig(file: file, reason: "preprocess_cfg.\(key) \(jsonText(value)) is not supported yet (only OpenAI's CLIP \(key) \(expected))")
            }
        }
        try close("mean", [0.48145466, 0.4578275, 0.40821073])
        try close("std", [0.26862954, 0.26130258, 0.27577711])
        for (key, standard) in [("interpolation", "bicubic"), ("resize_mode", "shortest")] {
            if let value = p.object[key], (value as? String) != standard {
                throw CheckpointError.badConfig(file: file, reason: "preprocess_cfg.\(key) \(jsonText(value)) is not supported (only \"\(standard)\")")
            }
        }
    }

    static func jsonText(_ value: Any) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.fragmentsAllowed, .sortedKeys]) else {
            return "\(value)"
        }
        return String(decoding: data, as: UTF8.self)
    }
}

/// An open_clip state dict seen under transformers' `CLIPModel` names. The renaming is a table built
/// once (without the ViT image tower's part when `visionLayers` is nil: MobileCLIP's towers are read under
/// their own names, which pass through); two tensors are reshaped on access: `attn.in_proj_weight` / `in_proj_bias` are split into
/// the q, k and v projections, and `visual.proj` / `text_projection` (used as x @ P) are transposed
/// into the (out, in) layout of a linear layer.
final class OpenCLIPNames: TensorSource, @unchecked Sendable {
    enum Source {
        case same(String)
        case rows(String, part: Int, of: Int)       // the part-th third of the leading dimension
        case transposed(String)
    }

    let base: TensorSource
    let table: [String: Source]
    /// The file's names some mapping reads (not visible under their own name).
    let referenced: Set<String>

    init(_ base: TensorSource, visionLayers: Int?, textLayers: Int, textPrefix: String) {
        self.base = base
        var t: [String: Source] = [:]
        func block(_ hf: String, _ oc: String) {
            t[hf + ".layer_norm1.weight"] = .same(oc + ".ln_1.weight")
            t[hf + ".layer_norm1.bias"] = .same(oc + ".ln_1.bias")
            for (i, p) in ["q_proj", "k_proj", "v_proj"].enumerated() {
                t[hf + ".self_attn.\(p).weight"] = .rows(oc + ".attn.in_proj_weight", part: i, of: 3)
                t[hf + ".self_attn.\(p).bias"] = .rows(oc + ".attn.in_proj_bias", part: i, of: 3)
            }
            t[hf + ".self_attn.out_proj.weight"] = .same(oc + ".attn.out_proj.weight")
            t[hf + ".self_attn.out_proj.bias"] = .same(oc + ".attn.out_proj.bias")
            t[hf + ".layer_norm2.weight"] = .same(oc + ".ln_2.weight")
            t[hf + ".layer_norm2.bias"] = .same(oc + ".ln_2.bias")
            t[hf + ".mlp.fc1.weight"] = .same(oc + ".mlp.c_fc.weight")
            t[hf + ".mlp.fc1.bias"] = .same(oc + ".mlp.c_fc.bias")
            t[hf + ".mlp.fc2.weight"] = .same(oc + ".mlp.c_proj.weight")
            t[hf + ".mlp.fc2.bias"] = .same(oc + ".mlp.c_proj.bias")
        }
        if let visionLayers {
            t["vision_model.embeddings.patch_embedding.weight"] = .same("visual.conv1.weight")
            t["vision_model.embeddings.class_embedding"] = .same("visual.class_embedding")
            t["vision_model.embeddings.position_embedding.weight"] = .same("visual.positional_embedding")
            t["vision_model.pre_layrnorm.weight"] = .same("visual.ln_pre.weight")
            t["vision_model.pre_layrnorm.bias"] = .same("visual.ln_pre.bias")
            for i in 0..<visionLayers {
                block("vision_model.encoder.layers.\(i)", "visual.transformer.resblocks.\(i)")
            }
            t["vision_model.post_layernorm.weight"] = .same("visual.ln_post.weight")
            t["vision_model.post_layernorm.bias"] = .same("visual.ln_post.bias")
            t["visual_projection.weight"] = .transposed("visual.proj")
        }
        let p = textPrefix
        t["text_model.embeddings.token_embedding.weight"] = .same(p + "token_embedding.weight")
        t["text_model.embeddings.position_embedding.weight"] = .same(p + "positional_embedding")
        for i in 0..<textLayers {
            block("text_model.encoder.layers.\(i)", p + "transformer.resblocks.\(i)")
        }
        t["text_model.final_layer_norm.weight"] = .same(p + "ln_final.weight")
        t["text_model.final_layer_norm.bias"] = .same(p + "ln_final.bias")
        t["text_projection.weight"] = .transposed(p + "text_projection")
        t["logit_scale"] = .same("logit_scale")
        table = t
        referenced = Set(t.values.map { source in
            switch source { case .same(let n), .rows(let n, _, _), .transposed(let n): return n }
        })
    }

    /// The mapped names present, and the file's names no mapping reads (so that the model's check for
    /// left-over tensors reports them).
    var tensorNames: [String] {
        table.keys.filter { shape(of: $0) != nil } + base.tensorNames.filter { !referenced.contains($0) }
    }

    func displayName(_ name: String) -> String {
        switch table[name] {
        case .same(let n)?, .rows(let n, _, _)?, .transposed(let n)?: return n
        case nil: return name
        }
    }

    func shape(of name: String) -> [Int]? {
        switch table[name] {
        case .same(let n)?: return base.shape(of: n)
        case .rows(let n, _, let count)?:
            guard var s = base.shape(of: n), let first = s.first, first % count == 0 else { return nil }
            s[0] = first / count
            return s
        case .transposed(let n)?:
            guard let s = base.shape(of: n), s.count == 2 else { return nil }
            return [s[1], s[0]]
        case nil: return referenced.contains(name) ? nil : base.shape(of: name)
        }
    }

    func floats(_ name: String) throws -> [Float] {
        switch table[name] {
        case .same(let n)?: return try base.floats(n)
        case .rows(let n, let part, let count)?:
            guard let s = base.shape(of: n), let first = s.first, first % count == 0 else {
                throw CheckpointError.missingTensor(n)
            }
            let all = try base.floats(n)
            let size = all.count / count
            return Array(all[(part * size)..<((part + 1) * size)])
        case .transposed(let n)?:
            guard let s = base.shape(of: n), s.count == 2 else { throw CheckpointError.missingTensor(n) }
            let all = try base.floats(n)
            var out = [Float](repeating: 0, count: all.count)
            for i in 0..<s[0] { for j in 0..<s[1] { out[j * s[0] + i] = all[i * s[1] + j] } }
            return out
        case nil:
            guard !referenced.contains(name) else { throw CheckpointError.missingTensor(name) }
            return try base.floats(name)
        }
    }
}

/// What a model folder holds: "clip" for an open_clip folder, otherwise `model_type` of its config.json
/// (nil when the key is absent). Throws `missingFile` naming both config files when neither exists.
public func modelType(folder: URL) throws -> String? {
    if OpenCLIPFolder.isOpenCLIP(folder) { return "clip" }
    let config = folder.appendingPathComponent("config.json")
    guard FileManager.default.fileExists(atPath: config.path) else {
        throw CheckpointError.missingFile("\(config.path) (or \(OpenCLIPFolder.configFile) for an open_clip model)")
    }
    return try readConfig(folder: folder)["model_type"] as? String
}

/// The file holding a model folder's weights (transformers' or open_clip's names), or nil.
public func weightsFile(folder: URL) -> URL? {
    let names = OpenCLIPFolder.isOpenCLIP(folder) ? OpenCLIPFolder.weightFiles : ["model.safetensors", "pytorch_model.bin"]
    return names.map { folder.appendingPathComponent($0) }.first { FileManager.default.fileExists(atPath: $0.path) }
}

/// Every file the weights are read from, in the order `openCheckpoint` / `OpenCLIPFolder` pick: one file,
/// or a shard index followed by its shards (sorted). Empty when there is none, or the index cannot be read.
public func weightsFiles(folder: URL) -> [URL] {
    if OpenCLIPFolder.isOpenCLIP(folder) { return weightsFile(folder: folder).map { [$0] } ?? [] }
    for name in ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"] {
        let url = folder.appendingPathComponent(name)
        guard FileManager.default.fileExists(atPath: url.path) else { continue }
        guard name.hasSuffix(".index.json") else { return [url] }
        guard let object = try? readJSONObject(url), let map = object["weight_map"] as? [String: String] else { return [] }
        return [url] + Set(map.values).sorted().map { folder.appendingPathComponent($0) }
    }
    return []
}
