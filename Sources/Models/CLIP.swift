import Foundation
import Kernels

/// `vision_config` of a CLIP config.json (transformers defaults = ViT-B/32).
public struct CLIPVisionConfig: Sendable {
    public var hiddenSize = 768, intermediateSize = 3072, numHiddenLayers = 12, numAttentionHeads = 12
    public var imageSize = 224, patchSize = 32, numChannels = 3
    public var hiddenAct = Activation.quickGelu
    public var layerNormEps: Float = 1e-5
    public var gridSize: Int { imageSize / patchSize }
    public var numPositions: Int { gridSize * gridSize + 1 }
}

/// `text_config` of a CLIP config.json (transformers defaults = the OpenAI text tower).
public struct CLIPTextConfig: Sendable {
    public var vocabSize = 49408, hiddenSize = 512, intermediateSize = 2048, numHiddenLayers = 12, numAttentionHeads = 8
    public var maxPositionEmbeddings = 77
    public var hiddenAct = Activation.quickGelu
    public var layerNormEps: Float = 1e-5
    public var eosTokenId = 49407
    /// Where a sequence's features are taken: transformers' rule (`.firstEOS`: the first `eos_token_id`,
    /// or the highest id for configs with the legacy eos_token_id 2), or open_clip's (the highest id).
    public var pooling = TextPooling.firstEOS
    /// Whether attention is causal (CLIP); open_clip's `no_causal_mask` (MobileCLIP S0/S1/S2) makes it false.
    public var causal = true
}

public enum TextPooling: Sendable {
    case firstEOS, highestID
}

public struct CLIPConfig: Sendable {
    public var visionConfig = CLIPVisionConfig()
    public var textConfig = CLIPTextConfig()
    public var projectionDim = 512

    public init() {}

    /// Reads a folder's config.json; absent keys take transformers' defaults.
    public init(folder: URL) throws {
        let c = try openConfig(folder)
        projectionDim = try c.int("projection_dim", 512)
        // Older configs carry `text_config_dict` / `vision_config_dict`; transformers then builds the sub-config
        // from that dict alone (defaults for what it lacks), overriding `text_config` / `vision_config`.
        let v = try c.sub(c.object["vision_config_dict"] is [String: Any] ? "vision_config_dict" : "vision_config")
        let t = try c.sub(c.object["text_config_dict"] is [String: Any] ? "text_config_dict" : "text_config")
        visionConfig.hiddenSize = try v.int("hidden_size", 768)
        visionConfig.intermediateSize = try v.int("intermediate_size", 3072)
        visionConfig.numHiddenLayers = try v.int("num_hidden_layers", 12)
        visionConfig.numAttentionHeads = try v.int("num_attention_heads", 12)
        visionConfig.imageSize = try v.int("image_size", 224)
        visionConfig.patchSize = try v.int("patch_size", 32)
        visionConfig.numChannels = try v.int("num_channels", 3)
        visionConfig.hiddenAct = try v.activation("hidden_act", .quickGelu)
        visionConfig.layerNormEps = try v.float("layer_norm_eps", 1e-5)
        textConfig.vocabSize = try t.int("vocab_size", 49408)
        textConfig.hiddenSize = try t.int("hidden_size", 512)
        textConfig.intermediateSize = try t.int("intermediate_size", 2048)
        textConfig.numHiddenLayers = try t.int("num_hidden_layers", 12)
        textConfig.numAttentionHeads = try t.int("num_attention_heads", 8)
        textConfig.maxPositionEmbeddings = try t.int("max_position_embeddings", 77)
        textConfig.hiddenAct = try t.activation("hidden_act", .quickGelu)
        textConfig.layerNormEps = try t.float("layer_norm_eps", 1e-5)
        textConfig.eosTokenId = try t.int("eos_token_id", 49407)
        // What the forward passes assume, checked here so a bad folder fails its job with a sentence.
        try v.checkHeads(visionConfig.hiddenSize, visionConfig.numAttentionHeads)
        try t.checkHeads(textConfig.hiddenSize, textConfig.numAttentionHeads)
        try v.checkRGB(visionConfig.numChannels)
        // Prompt tuning's strong view has a perspective transform whose four corners coincide on 1 pixel.
        if visionConfig.imageSize < 2 {
            throw v.bad("\(v.prefix)image_size \(visionConfig.imageSize) is too small: prompt tuning's strong view needs at least 2 pixels a side")
        }
        if visionConfig.imageSize % visionConfig.patchSize != 0 {
            throw v.bad("\(v.prefix)image_size \(visionConfig.imageSize) is not a multiple of \(v.prefix)patch_size \(visionConfig.patchSize)")
        }
        // The tokenizer's context is max_position_embeddings: BOS and EOS need two positions.
        if textConfig.maxPositionEmbeddings < 2 {
            throw t.bad("\(t.prefix)max_position_embeddings \(textConfig.maxPositionEmbeddings) leaves no room for BOS and EOS (at least 2)")
        }
    }
}

/// CLIP's `vision_model.*` tensors.
public struct CLIPVisionTransformer: @unchecked Sendable {
    public let config: CLIPVisionConfig
    let patchEmbedding: Linear          // embeddings.patch_embedding.weight (D,3,p,p) as (D,3·p·p), no bias
    let classEmbedding: Buffer          // embeddings.class_embedding (D)
    let positionEmbedding: Buffer       // embeddings.position_embedding.weight (1+np, D)
    let preLayrnorm: LayerNorm          // pre_layrnorm (sic, the checkpoint's spelling)
    let layers: [EncoderLayer]          // encoder.layers.i
    let postLayernorm: LayerNorm        // post_layernorm

    init(_ c: CLIPVisionConfig, _ w: inout WeightReader) throws {
        config = c
        let d = c.hiddenSize, p = c.patchSize, e = c.layerNormEps
        let conv = try w.tensor("vision_model.embeddings.patch_embedding.weight", [d, c.numChannels, p, p])
        patchEmbedding = Linear(weight: conv, bias: nil, inFeatures: c.numChannels * p * p, outFeatures: d)
        classEmbedding = try w.tensor("vision_model.embeddings.class_embedding", [d])
        positionEmbedding = try w.tensor("vision_model.embeddings.position_embedding.weight", [c.numPositions, d])
        preLayrnorm = try w.layerNorm("vision_model.pre_layrnorm", d, eps: e)
        layers = try (0..<c.numHiddenLayers).map { try readCLIPLayer(&w, "vision_model.encoder.layers.\($0)", d: d, inter: c.intermediateSize, eps: e) }
        postLayernorm = try w.layerNorm("vision_model.post_layernorm", d, eps: e)
    }
}

/// CLIP's `text_model.*` tensors.
public struct CLIPTextTransformer: @unchecked Sendable {
    public let config: CLIPTextConfig
    let tokenEmbedding: Buffer          // embeddings.token_embedding.weight (V,D)
    let positionEmbedding: Buffer       // embeddings.position_embedding.weight (77,D)
    let layers: [EncoderLayer]
    let finalLayerNorm: LayerNorm       // final_layer_norm

    init(_ c: CLIPTextConfig, _ w: inout WeightReader) throws {
        config = c
        let d = c.hiddenSize, e = c.layerNormEps
        tokenEmbedding = try w.tensor("text_model.embeddings.token_embedding.weight", [c.vocabSize, d])
        positionEmbedding = try w.tensor("text_model.embeddings.position_embedding.weight", [c.maxPositionEmbeddings, d])
        layers = try (0..<c.numHiddenLayers).map { try readCLIPLayer(&w, "text_model.encoder.layers.\($0)", d: d, inter: c.intermediateSize, eps: e) }
        finalLayerNorm = try w.layerNorm("text_model.final_layer_norm", d, eps: e)
    }
}

func readCLIPLayer(_ w: inout WeightReader, _ name: String, d: Int, inter: Int, eps: Float) throws -> EncoderLayer {
    EncoderLayer(norm1: try w.layerNorm(name + ".layer_norm1", d, eps: eps),
                 qkv: try w.packedQKV(q: name + ".self_attn.q_proj", k: name + ".self_attn.k_proj", v: name + ".self_attn.v_proj", d: d),
                 out: try w.linear(name + ".self_attn.out_proj", in: d, out: d),
                 scale1: nil,
                 norm2: try w.layerNorm(name + ".layer_norm2", d, eps: eps),
                 fc1: try w.linear(name + ".mlp.fc1", in: d, out: inter),
                 fc2: try w.linear(name + ".mlp.fc2", in: inter, out: d),
                 scale2: nil)
}

/// A Hugging Face `CLIPModel` (ViT-B/32, B/16, L/14, MetaCLIP, …). Weights are immutable after loading;
/// every call allocates its own activations, so concurrent calls may share one model.
public final class CLIPModel: @unchecked Sendable {
    public let config: CLIPConfig
    public let visionModel: CLIPVisionTransformer
    public let textModel: CLIPTextTransformer
    let visualProjection: Linear    // visual_projection.weight (P,Dv), no bias
    let textProjection: Linear      // text_projection.weight (P,Dt), no bias
    /// `logit_scale` (log of the softmax temperature's inverse, as stored).
    public let logitScale: Float

    /// A transformers `CLIPModel` folder (config.json), or an open_clip one (`OpenCLIPFolder`).
    public convenience init(folder: URL) throws {
        if OpenCLIPFolder.isOpenCLIP(folder) {
            let (config, weights) = try OpenCLIPFolder.load(folder)
            try self.init(config: config, weights: weights)
        } else {
            try self.init(config: CLIPConfig(folder: folder), weights: openCheckpoint(folder: folder))
        }
    }

    /// `weights` nil: random weights of the configured sizes (benchmarks).
    public init(config: CLIPConfig, weights: TensorSource?) throws {
        self.config = config
        var w = WeightReader(weights)
        visionModel = try CLIPVisionTransformer(config.visionConfig, &w)
        textModel = try CLIPTextTransformer(config.textConfig, &w)
        visualProjection = try w.linear("visual_projection", in: config.visionConfig.hiddenSize, out: config.projectionDim, bias: false)
        textProjection = try w.linear("text_projection", in: config.textConfig.hiddenSize, out: config.projectionDim, bias: false)
        logitScale = try w.tensor("logit_scale", []).array[0]
        try w.finish(ignoring: ["text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"])
    }

    public var projectionDim: Int { config.projectionDim }
}

// MARK: vision

/// The LayerNorms of the vision tower, frozen (the model's) or trainable copies (prompt tuning).
public struct CLIPVisionNorms: @unchecked Sendable {
    let preLayrnorm: LayerNorm
    let layers: [(layerNorm1: LayerNorm, layerNorm2: LayerNorm)]
    let postLayernorm: LayerNorm

    init(_ v: CLIPVisionTransformer) {
        preLayrnorm = v.preLayrnorm
        layers = v.layers.map { ($0.norm1, $0.norm2) }
        postLayernorm = v.postLayernorm
    }

    func copy() -> CLIPVisionNorms {
        CLIPVisionNorms(preLayrnorm: preLayrnorm.copy(), layers: layers.map { ($0.layerNorm1.copy(), $0.layerNorm2.copy()) },
                        postLayernorm: postLayernorm.copy())
    }

    init(preLayrnorm: LayerNorm, layers: [(layerNorm1: LayerNorm, layerNorm2: LayerNorm)], postLayernorm: LayerNorm) {
        self.preLayrnorm = preLayrnorm; self.layers = layers; self.postLayernorm = postLayernorm
    }

    /// (Hugging Face name, LayerNorm) for every norm, in checkpoint order.
    var named: [(String, LayerNorm)] {
        [("vision_model.pre_layrnorm", preLayrnorm)]
            + layers.enumerated().flatMap { i, l in
                [("vision_model.encoder.layers.\(i).layer_norm1", l.layerNorm1), ("vision_model.encoder.layers.\(i).layer_norm2", l.layerNorm2)]
            }
            + [("vision_model.post_layernorm", postLayernorm)]
    }
}

/// What the vision forward keeps for its backward (prompt tuning).
final class CLIPVisionTape {
    let embeddings: Buffer      // (B,1+np,D) before pre_layrnorm
    let preMean: Buffer, preRstd: Buffer
    let layers: [LayerActivations]
    let cls: Buffer             // (B,D) CLS rows of the last hidden state
    let postMean: Buffer, postRstd: Buffer
    let pooled: Buffer          // (B,D)
    init(b: Int, seq: Int, t: Int, c: CLIPVisionConfig) {
        let d = c.hiddenSize
        embeddings = Buffer(count: b * seq * d); preMean = Buffer(count: b * seq); preRstd = Buffer(count: b * seq)
        layers = (0..<c.numHiddenLayers).map { _ in
            LayerActivations(b: b, t: t, d: d, heads: c.numAttentionHeads, intermediate: c.intermediateSize, keepsInputs: true)
        }
        cls = Buffer(count: b * d); postMean = Buffer(count: b); postRstd = Buffer(count: b); pooled = Buffer(count: b * d)
    }
}

extension CLIPModel {
    /// Hidden states (B, 1+P+np, D) of the vision tower after `layerCount` encoder layers, with P prompt
    /// tokens (P,D) inserted after CLS after pre_layrnorm. pixels is (B,3,S,S), S = image_size.
    func visionHiddenStates(pixels: UnsafePointer<Float>, batch b: Int, prompts: UnsafePointer<Float>?, promptCount p: Int,
                            norms: CLIPVisionNorms, layerCount: Int, tape: CLIPVisionTape?) -> Buffer {
        let c = config.visionConfig, v = visionModel
        let d = c.hiddenSize, np = c.gridSize * c.gridSize, seq = 1 + np, t = seq + p
        // embeddings (B,1+np,D): [class_embedding; patches·Wᵀ] + position_embedding
        let emb = tape?.embeddings ?? Buffer(count: b * seq * d)
        let cols = Buffer(count: b * np * c.numChannels * c.patchSize * c.patchSize)
        im2colPatches(cols.data, pixels, b: b, c: c.numChannels, h: c.imageSize, w: c.imageSize, patch: c.patchSize)
        let patches = Buffer(count: b * np * d)
        v.patchEmbedding.forward(patches.data, cols.data, n: b * np)
        for bi in 0..<b {
            let row = emb.data + bi * seq * d
            copyFloats(row, v.classEmbedding.data, count: d)
            copyFloats(row + d, patches.data + bi * np * d, count: np * d)
            residualForward(row, row, v.positionEmbedding.data, count: seq * d)
        }
        // pre_layrnorm, then x (B,T,D) = [CLS; prompts; patches]
        let pre = Buffer(count: b * seq * d)
        norms.preLayrnorm.forward(pre.data, mean: tape?.preMean.data, rstd: tape?.preRstd.data, emb.data, n: b * seq)
        let x = Buffer(count: b * t * d)
        for bi in 0..<b {
            let dst = x.data + bi * t * d, src = pre.data + bi * seq * d
            copyFloats(dst, src, count: d)
            if let prompts { copyFloats(dst + d, prompts, count: p * d) }
            copyFloats(dst + (1 + p) * d, src + d, count: np * d)
        }
        let shared = tape == nil ? LayerActivations(b: b, t: t, d: d, heads: c.numAttentionHeads, intermediate: c.intermediateSize, keepsInputs: false) : nil
        for (i, layer) in v.layers.prefix(layerCount).enumerated() {
            encoderLayerForward(layer, x.data, tape?.layers[i] ?? shared!, heads: c.numAttentionHeads, activation: c.hiddenAct,
                                causal: false, norm1: norms.layers[i].layerNorm1, norm2: norms.layers[i].layerNorm2)
        }
        withExtendedLifetime((emb, cols, patches, pre, shared, tape)) {}
        return x
    }

    /// `get_image_features`: visual_projection(post_layernorm(CLS)), (B, projection_dim), for pixels (B,3,S,S).
    public func getImageFeatures(pixels: UnsafePointer<Float>, batch b: Int) -> [Float] {
        imageFeatures(pixels: pixels, batch: b, prompts: nil, promptCount: 0, norms: CLIPVisionNorms(visionModel))
    }

    /// imageFeatures with the batch split across threads (`batchParallel`).
    func imageFeatures(pixels: UnsafePointer<Float>, batch b: Int, prompts: UnsafePointer<Float>?, promptCount p: Int,
                       norms: CLIPVisionNorms) -> [Float] {
        let c = config.visionConfig, image = c.numChannels * c.imageSize * c.imageSize, e = projectionDim
        var out = [Float](repeating: 0, count: b * e)
        out.withUnsafeMutableBufferPointer { o in
            let o = o.baseAddress!
            batchParallel(b) { r in
                let part = imageFeaturesOfSubBatch(pixels: pixels + r.lowerBound * image, batch: r.count, prompts: prompts,
                                                  promptCount: p, norms: norms)
                copyFloats(o + r.lowerBound * e, part, count: part.count)
            }
        }
        return out
    }

    public func getImageFeatures(pixels: [Float], batch b: Int) -> [Float] {
        let c = config.visionConfig
        precondition(pixels.count == b * c.numChannels * c.imageSize * c.imageSize, "pixels must be (B,3,S,S)")
        return pixels.withUnsafeBufferPointer { getImageFeatures(pixels: $0.baseAddress!, batch: b) }
    }

    func imageFeaturesOfSubBatch(pixels: UnsafePointer<Float>, batch b: Int, prompts: UnsafePointer<Float>?, promptCount p: Int,
                                norms: CLIPVisionNorms) -> [Float] {
        let c = config.visionConfig, d = c.hiddenSize, last = c.numHiddenLayers - 1
        let x = visionHiddenStates(pixels: pixels, batch: b, prompts: prompts, promptCount: p, norms: norms,
                                   layerCount: last, tape: nil)
        let t = x.count / (b * d)
        let acts = LayerActivations(b: b, t: t, d: d, heads: c.numAttentionHeads, intermediate: c.intermediateSize, keepsInputs: false)
        let cls = encoderLayerForwardRow(visionModel.layers[last], x.data, row: 0, acts, heads: c.numAttentionHeads,
                                         activation: c.hiddenAct, causal: false,
                                         norm1: norms.layers[last].layerNorm1, norm2: norms.layers[last].layerNorm2)
        let pooled = Buffer(count: b * d)
        norms.postLayernorm.forward(pooled.data, mean: nil, rstd: nil, cls.data, n: b)
        var out = [Float](repeating: 0, count: b * projectionDim)
        visualProjection.forward(&out, pooled.data, n: b)
        withExtendedLifetime((x, acts, cls, pooled)) {}
        return out
    }
}

// MARK: text

extension CLIPTextConfig {
    private func poolingAtHighestID(_ ids: [Int32]) -> Int {
        ids.indices.max { ids[$0] < ids[$1] || (ids[$0] == ids[$1] && $0 > $1) } ?? 0
    }

    /// The position a sequence is pooled at (`TextPooling`): the first `eos_token_id`, or the first
    /// position of the highest id.
    public func poolingPosition(_ ids: [Int32]) -> Int {
        switch pooling {
        case .highestID: return poolingAtHighestID(ids)
        case .firstEOS where eosTokenId == 2: return poolingAtHighestID(ids)
        case .firstEOS: return ids.firstIndex(of: Int32(eosTokenId)) ?? 0
        }
    }
}

extension CLIPModel {
    /// The position a sequence is pooled at (`CLIPTextConfig.poolingPosition`).
    public func poolingPosition(_ ids: [Int32]) -> Int { config.textConfig.poolingPosition(ids) }

    /// `get_text_features` for each id sequence (BOS … EOS, padding optional): (N, projection_dim).
    public func getTextFeatures(_ sequences: [[Int32]]) -> [Float] {
        textTowerFeatures(textModel, projection: textProjection, sequences)
    }
}

/// The projected features (N, P) of a CLIP text tower (transformers' or open_clip's, also MobileCLIP's) for
/// each id sequence (BOS … EOS, padding optional). With the causal mask each sequence runs only up to its
/// pooling position; without it (`causal` false: MobileCLIP S0/S1/S2, every token sees every other) each runs
/// over the whole context padded with id 0, as open_clip's tokenizer pads. Sequences that share (length,
/// pooled row) share a batch.
func textTowerFeatures(_ text: CLIPTextTransformer, projection: Linear, _ sequences: [[Int32]]) -> [Float] {
    let c = text.config, d = c.hiddenSize, e = projection.outFeatures
    var out = [Float](repeating: 0, count: sequences.count * e)
    precondition(sequences.allSatisfy { !$0.isEmpty }, "an id sequence is empty (BOS … EOS expected)")
    let rows = sequences.map { c.poolingPosition($0) }
    let lengths = rows.map { c.causal ? $0 + 1 : c.maxPositionEmbeddings }
    // equal (length, row) share a batch, at most 128 sequences (bounds the activations: 128·77 tokens)
    let keys = Set(zip(lengths, rows).map { [$0, $1] }).sorted { $0.lexicographicallyPrecedes($1) }
    let batches = keys.flatMap { key in
        let all = lengths.indices.filter { lengths[$0] == key[0] && rows[$0] == key[1] }
        return stride(from: 0, to: all.count, by: 128).map { (key[0], key[1], Array(all[$0..<min($0 + 128, all.count)])) }
    }
    for (length, row, members) in batches {
        precondition(length <= c.maxPositionEmbeddings && (c.causal || members.allSatisfy { sequences[$0].count <= length }),
                     "sequence longer than max_position_embeddings")
        let b = members.count
        let x = Buffer(count: b * length * d)
        for (bi, s) in members.enumerated() {
            for pos in 0..<length {
                let id = pos < sequences[s].count ? Int(sequences[s][pos]) : 0
                precondition(id >= 0 && id < c.vocabSize, "token id \(id) outside the vocabulary")
                residualForward(x.data + (bi * length + pos) * d, text.tokenEmbedding.data + id * d,
                                text.positionEmbedding.data + pos * d, count: d)
            }
        }
        let acts = LayerActivations(b: b, t: length, d: d, heads: c.numAttentionHeads, intermediate: c.intermediateSize, keepsInputs: false)
        for layer in text.layers.dropLast() {
            encoderLayerForward(layer, x.data, acts, heads: c.numAttentionHeads, activation: c.hiddenAct, causal: c.causal)
        }
        let last = encoderLayerForwardRow(text.layers.last!, x.data, row: row, acts, heads: c.numAttentionHeads,
                                          activation: c.hiddenAct, causal: c.causal)
        let pooled = Buffer(count: b * d)
        text.finalLayerNorm.forward(pooled.data, mean: nil, rstd: nil, last.data, n: b)
        let features = Buffer(count: b * e)
        projection.forward(features.data, pooled.data, n: b)
        for (bi, s) in members.enumerated() {
            for j in 0..<e { out[s * e + j] = features.data[bi * e + j] }
        }
        withExtendedLifetime((x, acts, last, pooled, features)) {}
    }
    return out
}
