import Kernels

/// The trainable state of NoLA's prompt tuning on a ViT tower (step 3): P prompt tokens after CLS, every
/// LayerNorm of the tower (copies, `Norms`; the model stays frozen), and a linear head (C, projection_dim)
/// without bias on the (optionally L2-normalised) image features. Gradients accumulate across the tower's
/// `promptTuningStep` calls until `zeroGrads()`.
/// `CLIPPromptTuning` (CLIP's vision tower) and `MobileCLIPViTPromptTuning` (MobileCLIP-B's trunk) are it.
public final class ViTPromptTuning<Norms>: @unchecked Sendable {
    public let promptCount: Int
    public let classCount: Int
    public let normalizesFeatures: Bool
    public let prompts: Buffer          // (P,D)
    public let head: Buffer             // (C,projection_dim)
    let norms: Norms
    /// (checkpoint name, LayerNorm) of every norm in `norms`, in checkpoint order.
    let namedNorms: [(String, LayerNorm)]
    let promptsGrad: Buffer
    let headGrad: Buffer
    let normGrads: [LayerNormGrads]     // in `namedNorms` order
    /// Activations (the tower's own tape type) and scratch of the last step, reused while the batch size stays the same.
    var workspace: (batch: Int, tape: Any, scratch: LayerGradScratch)?

    /// Starts from `norms` (the state's own copies, listed by `named`) and the given prompts (P·width values)
    /// and head (C·projectionDim values).
    init(norms: Norms, named: [(String, LayerNorm)], width: Int, projectionDim: Int, prompts: [Float], promptCount: Int,
         head: [Float], classCount: Int, normalizesFeatures: Bool) {
        precondition(prompts.count == promptCount * width && head.count == classCount * projectionDim)
        self.promptCount = promptCount
        self.classCount = classCount
        self.normalizesFeatures = normalizesFeatures
        self.prompts = Buffer(prompts)
        self.head = Buffer(head)
        self.norms = norms
        namedNorms = named
        promptsGrad = Buffer(count: prompts.count)
        headGrad = Buffer(count: head.count)
        normGrads = named.map { LayerNormGrads(weight: Buffer(count: $0.1.c), bias: Buffer(count: $0.1.c)) }
    }

    /// Every trained tensor with its gradient: "prompts", "head.weight", and each LayerNorm by its name
    /// ("vision_model.encoder.layers.0.layer_norm1.weight" on CLIP, "visual.trunk.blocks.0.norm1.weight" on
    /// MobileCLIP-B, …). `isBias` marks biases.
    public var parameters: [(name: String, value: Buffer, grad: Buffer, isBias: Bool)] {
        var list: [(name: String, value: Buffer, grad: Buffer, isBias: Bool)] = [("prompts", prompts, promptsGrad, false), ("head.weight", head, headGrad, false)]
        for ((name, norm), g) in zip(namedNorms, normGrads) {
            list.append((name + ".weight", norm.weight, g.weight, false))
            list.append((name + ".bias", norm.bias, g.bias, true))
        }
        return list
    }

    public func zeroGrads() { for p in parameters { p.grad.zero() } }

    /// The head's logits (B,C) on image features (B, projection_dim): L2-normalised first when
    /// `normalizesFeatures`, then the linear head.
    func headLogits(_ features: [Float], batch b: Int) -> [Float] {
        let e = head.count / classCount
        let inp = Buffer(features)
        if normalizesFeatures { l2NormalizeForward(inp.data, norms: nil, inp.data, n: b, c: e) }
        var logits = [Float](repeating: 0, count: b * classCount)
        linearForward(&logits, inp.data, head.data, nil, n: b, inFeatures: e, outFeatures: classCount)
        withExtendedLifetime(inp) {}
        return logits
    }
}

/// CLIP prompt tuning: the prompts go after CLS after pre_layrnorm; the norms are every vision LayerNorm under
/// its Hugging Face name.
public typealias CLIPPromptTuning = ViTPromptTuning<CLIPVisionNorms>

extension ViTPromptTuning where Norms == CLIPVisionNorms {
    /// Starts from the model's LayerNorms and the given prompts (P·D values) and head (C·projection_dim values).
    public convenience init(model: CLIPModel, prompts: [Float], promptCount: Int, head: [Float], classCount: Int, normalizesFeatures: Bool = true) {
        let norms = CLIPVisionNorms(model.visionModel).copy()
        self.init(norms: norms, named: norms.named, width: model.config.visionConfig.hiddenSize, projectionDim: model.projectionDim,
                  prompts: prompts, promptCount: promptCount, head: head, classCount: classCount, normalizesFeatures: normalizesFeatures)
    }
}

extension CLIPModel {
    /// Image features (B, projection_dim) with the tuned prompts and LayerNorms, and the head's logits (B,C).
    public func promptTunedLogits(_ s: CLIPPromptTuning, pixels: UnsafePointer<Float>, batch b: Int) -> (features: [Float], logits: [Float]) {
        let features = imageFeatures(pixels: pixels, batch: b, prompts: s.prompts.data, promptCount: s.promptCount, norms: s.norms)
        return (features, s.headLogits(features, batch: b))
    }

    /// One micro-batch of prompt tuning (one at a time per state: the state holds the step's activations): forward with prompts, head logits (B,C), `loss` turns them into a
    /// scalar and writes ∂loss/∂logits (B,C); the backward accumulates gradients of the prompts, every vision
    /// LayerNorm and the head into `s`. Frozen weights get input gradients only. Returns the loss.
    public func promptTuningStep(_ s: CLIPPromptTuning, pixels: UnsafePointer<Float>, batch b: Int,
                                 loss: (_ logits: UnsafePointer<Float>, _ dlogits: UnsafeMutablePointer<Float>) -> Float) -> Float {
        let c = config.visionConfig, d = c.hiddenSize, pd = projectionDim, classes = s.classCount, p = s.promptCount
        let np = c.gridSize * c.gridSize, seq = 1 + np, t = seq + p
        if s.workspace?.batch != b {
            s.workspace = nil
            s.workspace = (b, CLIPVisionTape(b: b, seq: seq, t: t, c: c), LayerGradScratch(n: b * t, d: d, intermediate: c.intermediateSize))
        }
        let tape = s.workspace!.tape as! CLIPVisionTape, scratch = s.workspace!.scratch
        // layers 0..<L−1 in full, the last one for the CLS row only
        let last = c.numHiddenLayers - 1
        let x = visionHiddenStates(pixels: pixels, batch: b, prompts: s.prompts.data, promptCount: p, norms: s.norms,
                                   layerCount: last, tape: tape)
        let cls = encoderLayerForwardRow(visionModel.layers[last], x.data, row: 0, tape.layers[last], heads: c.numAttentionHeads,
                                         activation: c.hiddenAct, causal: false,
                                         norm1: s.norms.layers[last].layerNorm1, norm2: s.norms.layers[last].layerNorm2)
        copyFloats(tape.cls.data, cls.data, count: b * d)
        s.norms.postLayernorm.forward(tape.pooled.data, mean: tape.postMean.data, rstd: tape.postRstd.data, tape.cls.data, n: b)
        let features = Buffer(count: b * pd), normalized = Buffer(count: b * pd), featureNorms = Buffer(count: b)
        visualProjection.forward(features.data, tape.pooled.data, n: b)
        let headInput = s.normalizesFeatures ? normalized : features
        if s.normalizesFeatures { l2NormalizeForward(normalized.data, norms: featureNorms.data, features.data, n: b, c: pd) }
        let logits = Buffer(count: b * classes), dlogits = Buffer(count: b * classes)
        linearForward(logits.data, headInput.data, s.head.data, nil, n: b, inFeatures: pd, outFeatures: classes)
        let value = loss(logits.data, dlogits.data)

        withProfilePhase(.backward) {
            // logits = headInput · headᵀ
            let dHeadInput = Buffer(count: b * pd)
            linearBackward(dinp: dHeadInput.data, dweight: s.headGrad.data, dbias: nil, dlogits.data, headInput.data, s.head.data,
                           n: b, inFeatures: pd, outFeatures: classes)
            // normalized = features / ‖features‖
            let dFeatures: Buffer
            if s.normalizesFeatures {
                dFeatures = Buffer(count: b * pd)
                l2NormalizeBackward(dinp: dFeatures.data, dHeadInput.data, normalized.data, norms: featureNorms.data, n: b, c: pd)
            } else { dFeatures = dHeadInput }
            // features = pooled · visual_projectionᵀ ; pooled = post_layernorm(cls)
            let dPooled = Buffer(count: b * d), dCls = Buffer(count: b * d)
            linearBackward(dinp: dPooled.data, dweight: nil, dbias: nil, dFeatures.data, tape.pooled.data, visualProjection.weight.data,
                           n: b, inFeatures: d, outFeatures: pd)
            let g = s.normGrads
            layerNormBackward(dinp: dCls.data, dweight: g.last!.weight.data, dbias: g.last!.bias.data, dPooled.data, tape.cls.data,
                              s.norms.postLayernorm.weight.data, mean: tape.postMean.data, rstd: tape.postRstd.data, n: b, c: d)
            // cls = last_layer(x)[:, 0]; then the other encoder layers in reverse
            let dx = Buffer(count: b * t * d)
            encoderLayerBackwardRow(visionModel.layers[last], dx: dx.data, dCls.data, row: 0, tape.layers[last], scratch,
                                    heads: c.numAttentionHeads, activation: c.hiddenAct, norm1: s.norms.layers[last].layerNorm1,
                                    norm2: s.norms.layers[last].layerNorm2, g1: g[1 + 2 * last], g2: g[2 + 2 * last])
            for i in (0..<last).reversed() {
                encoderLayerBackward(visionModel.layers[i], dx.data, tape.layers[i], scratch, heads: c.numAttentionHeads,
                                     activation: c.hiddenAct, norm1: s.norms.layers[i].layerNorm1, norm2: s.norms.layers[i].layerNorm2,
                                     g1: g[1 + 2 * i], g2: g[2 + 2 * i])
            }
            // x = [pre_layrnorm(emb)[:, :1]; prompts; pre_layrnorm(emb)[:, 1:]]
            let dPre = Buffer(count: b * seq * d)
            for bi in 0..<b {
                let src = dx.data + bi * t * d, dst = dPre.data + bi * seq * d
                copyFloats(dst, src, count: d)
                profiled(.copy) { for j in 0..<(p * d) { s.promptsGrad.data[j] += src[d + j] } }
                copyFloats(dst + d, src + (1 + p) * d, count: np * d)
            }
            layerNormBackward(dinp: nil, dweight: g[0].weight.data, dbias: g[0].bias.data, dPre.data, tape.embeddings.data,
                              s.norms.preLayrnorm.weight.data, mean: tape.preMean.data, rstd: tape.preRstd.data, n: b * seq, c: d)
            withExtendedLifetime((dHeadInput, dFeatures, dPooled, dCls, dx, dPre)) {}
        }
        withExtendedLifetime((tape, x, features, normalized, featureNorms, logits, dlogits)) {}
        withExtendedLifetime((scratch, cls)) {}
        return value
    }
}
