import Foundation
import Kernels

/// config.json of a `ViTModel` (DINO: facebook/dino-vitb16, -vits16, -vitb8) or a `Dinov2Model`.
public struct ViTConfig: Sendable {
    public var hiddenSize = 768, numHiddenLayers = 12, numAttentionHeads = 12, intermediateSize = 3072
    public var imageSize = 224, patchSize = 16, numChannels = 3
    public var hiddenAct = Activation.gelu
    public var layerNormEps: Float = 1e-12
    public var gridSize: Int { imageSize / patchSize }

    public init() {}

    /// `model_type` "vit" (ViTConfig defaults) or "dinov2" (Dinov2Config defaults: patch 14, eps 1e-6, mlp_ratio).
    init(_ c: ConfigReader, dinov2: Bool) throws {
        hiddenSize = try c.int("hidden_size", 768)
        numHiddenLayers = try c.int("num_hidden_layers", 12)
        numAttentionHeads = try c.int("num_attention_heads", 12)
        imageSize = try c.int("image_size", 224)
        patchSize = try c.int("patch_size", dinov2 ? 14 : 16)
        numChannels = try c.int("num_channels", 3)
        hiddenAct = try c.activation("hidden_act", .gelu)
        layerNormEps = try c.float("layer_norm_eps", dinov2 ? 1e-6 : 1e-12)
        intermediateSize = dinov2 ? hiddenSize * (try c.int("mlp_ratio", 4)) : try c.int("intermediate_size", 3072)
        try c.checkHeads(hiddenSize, numAttentionHeads)
        try c.checkRGB(numChannels)
        // ViT takes image_size × image_size only; DINOv2 interpolates its position grid to any multiple
        // of the patch size, but needs a grid of at least one patch to interpolate from.
        if !dinov2 && imageSize % patchSize != 0 {
            throw c.bad("image_size \(imageSize) is not a multiple of patch_size \(patchSize)")
        }
        if dinov2 && imageSize < patchSize {
            throw c.bad("image_size \(imageSize) is smaller than patch_size \(patchSize)")
        }
        if dinov2, let swiglu = c.object["use_swiglu_ffn"] as? Bool, swiglu {
            throw CheckpointError.badConfig(file: c.file, reason: "use_swiglu_ffn (DINOv2 giant) is not supported")
        }
    }
}

/// A Hugging Face `ViTModel` (DINO) or `Dinov2Model`: patch embedding with bias, CLS token, position
/// embeddings, pre-norm encoder layers (DINOv2: with layer scale), final `layernorm`.
/// Weights are immutable after loading; calls allocate their own activations.
public final class ViTModel: @unchecked Sendable {
    public enum Kind: Sendable { case vit, dinov2 }
    public let kind: Kind
    public let config: ViTConfig
    let projection: Linear            // embeddings.patch_embeddings.projection (D,3,p,p) as (D,3·p·p), bias
    let clsToken: Buffer              // embeddings.cls_token (1,1,D)
    let positionEmbeddings: Buffer    // embeddings.position_embeddings (1,1+np,D)
    let layers: [EncoderLayer]        // encoder.layer.i
    let layernorm: LayerNorm          // layernorm

    /// Reads config.json (`model_type` vit or dinov2) and the weights of a model folder.
    public convenience init(folder: URL) throws {
        let c = try openConfig(folder)
        let type = c.string("model_type") ?? "vit"
        guard type == "vit" || type == "dinov2" else {
            throw CheckpointError.badConfig(file: c.file, reason: "model_type \(type) is not vit or dinov2")
        }
        let kind: Kind = type == "dinov2" ? .dinov2 : .vit
        try self.init(kind: kind, config: ViTConfig(c, dinov2: kind == .dinov2),
                      weights: TransformersInMemoryNames.wrap(try openCheckpoint(folder: folder)))
    }

    /// `weights` nil: random weights of the configured sizes (benchmarks).
    public init(kind: Kind, config c: ViTConfig, weights: TensorSource?) throws {
        self.kind = kind
        config = c
        // task models (ViTForImageClassification, …) nest the backbone under "vit." / "dinov2."
        let nested = kind == .vit ? "vit." : "dinov2."
        var w = WeightReader(weights, prefix: weights?.shape(of: nested + "embeddings.cls_token") != nil ? nested : "")
        let d = c.hiddenSize, p = c.patchSize, e = c.layerNormEps, inter = c.intermediateSize
        let conv = try w.tensor("embeddings.patch_embeddings.projection.weight", [d, c.numChannels, p, p])
        projection = Linear(weight: conv, bias: try w.tensor("embeddings.patch_embeddings.projection.bias", [d]),
                            inFeatures: c.numChannels * p * p, outFeatures: d)
        clsToken = try w.tensor("embeddings.cls_token", [1, 1, d])
        positionEmbeddings = try w.tensor("embeddings.position_embeddings", [1, c.gridSize * c.gridSize + 1, d])
        layers = try (0..<c.numHiddenLayers).map { i in
            let n = "encoder.layer.\(i)"
            let attention = try w.packedQKV(q: n + ".attention.attention.query", k: n + ".attention.attention.key",
                                            v: n + ".attention.attention.value", d: d)
            let out = try w.linear(n + ".attention.output.dense", in: d, out: d)
            switch kind {
            case .vit:
                return EncoderLayer(norm1: try w.layerNorm(n + ".layernorm_before", d, eps: e), qkv: attention, out: out, scale1: nil,
                                    norm2: try w.layerNorm(n + ".layernorm_after", d, eps: e),
                                    fc1: try w.linear(n + ".intermediate.dense", in: d, out: inter),
                                    fc2: try w.linear(n + ".output.dense", in: inter, out: d), scale2: nil)
            case .dinov2:
                return EncoderLayer(norm1: try w.layerNorm(n + ".norm1", d, eps: e), qkv: attention, out: out,
                                    scale1: try w.tensor(n + ".layer_scale1.lambda1", [d]),
                                    norm2: try w.layerNorm(n + ".norm2", d, eps: e),
                                    fc1: try w.linear(n + ".mlp.fc1", in: d, out: inter),
                                    fc2: try w.linear(n + ".mlp.fc2", in: inter, out: d),
                                    scale2: try w.tensor(n + ".layer_scale2.lambda1", [d]))
            }
        }
        layernorm = try w.layerNorm("layernorm", d, eps: e)
        // ViT's pooler (tanh head, unused by DINO features) and DINOv2's mask_token (masked training only)
        // are present in checkpoints but play no part here; a task model's classifier likewise.
        try w.finish(ignoring: ["pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token",
                                "classifier.weight", "classifier.bias"])
    }

    /// Position embeddings (1+gh·gw, D) for a gh×gw grid: as stored when it matches, else (DINOv2) the patch
    /// part resized bicubically as transformers' `interpolate_pos_encoding`.
    func positions(gh: Int, gw: Int) -> Buffer {
        let d = config.hiddenSize, g = config.gridSize
        if gh == g && gw == g { return positionEmbeddings }
        let grid = Buffer(count: d * g * g), resized = Buffer(count: d * gh * gw), out = Buffer(count: (1 + gh * gw) * d)
        for i in 0..<(g * g) { for c in 0..<d { grid.data[c * g * g + i] = positionEmbeddings.data[(1 + i) * d + c] } }
        bicubicResize(resized.data, grid.data, c: d, inH: g, inW: g, outH: gh, outW: gw)
        copyFloats(out.data, positionEmbeddings.data, count: d)
        for i in 0..<(gh * gw) { for c in 0..<d { out.data[(1 + i) * d + c] = resized.data[c * gh * gw + i] } }
        withExtendedLifetime((grid, resized)) {}
        return out
    }

    /// Whether the model takes (B,3,H,W) input of this size: ViT only image_size × image_size, DINOv2 any
    /// multiple of the patch size (its position grid is interpolated).
    public func accepts(height h: Int, width w: Int) -> Bool {
        switch kind {
        case .vit: return h == config.imageSize && w == config.imageSize && h % config.patchSize == 0
        case .dinov2: return h > 0 && w > 0 && h % config.patchSize == 0 && w % config.patchSize == 0
        }
    }

    /// The input sizes `accepts`, in words: "224×224" or "a multiple of 14 on each side".
    public var inputSizeRule: String {
        switch kind {
        case .vit: return "\(config.imageSize)×\(config.imageSize)"
        case .dinov2: return "a multiple of \(config.patchSize) on each side"
        }
    }

    /// Hidden states (B, 1+gh·gw, D) after `layerCount` layers (the final layernorm applied when all run).
    /// pixels is (B,3,H,W); ViT needs H = W = image_size, DINOv2 any multiple of patch_size.
    func hiddenStates(pixels: UnsafePointer<Float>, batch b: Int, height h: Int, width w: Int, layerCount: Int) -> Buffer {
        let c = config, d = c.hiddenSize, p = c.patchSize
        precondition(accepts(height: h, width: w), "\(h)×\(w) input, the model takes \(inputSizeRule) (callers check `accepts`)")
        let gh = h / p, gw = w / p, np = gh * gw, t = 1 + np
        let cols = Buffer(count: b * np * c.numChannels * p * p), patches = Buffer(count: b * np * d)
        im2colPatches(cols.data, pixels, b: b, c: c.numChannels, h: h, w: w, patch: p)
        projection.forward(patches.data, cols.data, n: b * np)
        let pos = positions(gh: gh, gw: gw)
        let x = Buffer(count: b * t * d)
        for bi in 0..<b {
            let row = x.data + bi * t * d
            copyFloats(row, clsToken.data, count: d)
            copyFloats(row + d, patches.data + bi * np * d, count: np * d)
            residualForward(row, row, pos.data, count: t * d)
        }
        let acts = LayerActivations(b: b, t: t, d: d, heads: c.numAttentionHeads, intermediate: c.intermediateSize, keepsInputs: false)
        for layer in layers.prefix(layerCount) {
            encoderLayerForward(layer, x.data, acts, heads: c.numAttentionHeads, activation: c.hiddenAct, causal: false)
        }
        if layerCount == layers.count { layernorm.forward(x.data, mean: nil, rstd: nil, x.data, n: b * t) }
        withExtendedLifetime((cols, patches, pos, acts)) {}
        return x
    }

    /// The image embedding: the CLS token of the last hidden state after the final layernorm, (B,D).
    public func clsFeatures(pixels: UnsafePointer<Float>, batch b: Int, height h: Int, width w: Int) -> [Float] {
        let d = config.hiddenSize, image = config.numChannels * h * w
        var out = [Float](repeating: 0, count: b * d)
        out.withUnsafeMutableBufferPointer { o in
            let o = o.baseAddress!
            batchParallel(b) { r in
                let part = clsFeaturesOfSubBatch(pixels: pixels + r.lowerBound * image, batch: r.count, height: h, width: w)
                copyFloats(o + r.lowerBound * d, part, count: part.count)
            }
        }
        return out
    }

    func clsFeaturesOfSubBatch(pixels: UnsafePointer<Float>, batch b: Int, height h: Int, width w: Int) -> [Float] {
        let c = config, d = c.hiddenSize
        let x = hiddenStates(pixels: pixels, batch: b, height: h, width: w, layerCount: layers.count - 1)
        let t = x.count / (b * d)
        let acts = LayerActivations(b: b, t: t, d: d, heads: c.numAttentionHeads, intermediate: c.intermediateSize, keepsInputs: false)
        let cls = encoderLayerForwardRow(layers[layers.count - 1], x.data, row: 0, acts, heads: c.numAttentionHeads,
                                         activation: c.hiddenAct, causal: false)
        var out = [Float](repeating: 0, count: b * d)
        layernorm.forward(&out, mean: nil, rstd: nil, cls.data, n: b)
        withExtendedLifetime((x, acts, cls)) {}
        return out
    }
}
