import Kernels

/// Prompt tuning on MobileCLIP-B's ViT tower (NoLA step 3, as on CLIP's ViT): P prompt tokens inserted after
/// CLS before the first block (the trunk has no pre-norm: [CLS; prompts; patches + pos_embed]), every
/// LayerNorm of the trunk under its checkpoint name ("visual.trunk.blocks.0.norm1", …, "visual.trunk.norm"),
/// and the linear head (C, embed_dim); the state is `ViTPromptTuning` (PromptTuning.swift).
public typealias MobileCLIPViTPromptTuning = ViTPromptTuning<MobileCLIPViTNorms>

extension ViTPromptTuning where Norms == MobileCLIPViTNorms {
    public convenience init(tower: MobileCLIPViT, prompts: [Float], promptCount: Int, head: [Float], classCount: Int, normalizesFeatures: Bool = true) {
        let norms = MobileCLIPViTNorms(tower).copy()
        self.init(norms: norms, named: norms.named, width: tower.hiddenSize, projectionDim: tower.projectionDim,
                  prompts: prompts, promptCount: promptCount, head: head, classCount: classCount, normalizesFeatures: normalizesFeatures)
    }
}

extension MobileCLIPViT {
    /// Image features (B, embed_dim) with the tuned prompts and LayerNorms, and the head's logits (B,C).
    public func promptTunedLogits(_ s: MobileCLIPViTPromptTuning, pixels: UnsafePointer<Float>, batch b: Int) -> (features: [Float], logits: [Float]) {
        let features = imageFeatures(pixels: pixels, batch: b, prompts: s.prompts.data, promptCount: s.promptCount, norms: s.norms)
        return (features, s.headLogits(features, batch: b))
    }

    /// One micro-batch of prompt tuning (one at a time per state): forward with prompts, head logits (B,C),
    /// `loss` turns them into a scalar and writes ∂loss/∂logits (B,C); the backward accumulates gradients of
    /// the prompts, every LayerNorm and the head into `s`. The stem and the frozen weights get none. Returns the loss.
    public func promptTuningStep(_ s: MobileCLIPViTPromptTuning, pixels: UnsafePointer<Float>, batch b: Int,
                                 loss: (_ logits: UnsafePointer<Float>, _ dlogits: UnsafeMutablePointer<Float>) -> Float) -> Float {
        let d = hiddenSize, pd = projectionDim, classes = s.classCount, p = s.promptCount, t = 1 + p + numPatches
        if s.workspace?.batch != b {
            s.workspace = nil
            let tape = blocks.map { _ in LayerActivations(b: b, t: t, d: d, heads: numHeads, intermediate: intermediateSize, keepsInputs: true) }
            s.workspace = (b, tape, LayerGradScratch(n: b * t, d: d, intermediate: intermediateSize))
        }
        let tape = s.workspace!.tape as! [LayerActivations], scratch = s.workspace!.scratch
        // blocks 0..<L−1 in full, the last one for the CLS row only
        let last = blocks.count - 1
        let x = hiddenStates(pixels: pixels, batch: b, prompts: s.prompts.data, promptCount: p, norms: s.norms, layerCount: last, tape: tape)
        let cls = encoderLayerForwardRow(blocks[last], x.data, row: 0, tape[last], heads: numHeads, activation: .gelu, causal: false,
                                         norm1: s.norms.blocks[last].norm1, norm2: s.norms.blocks[last].norm2)
        let pooled = Buffer(count: b * d), normMean = Buffer(count: b), normRstd = Buffer(count: b)
        s.norms.norm.forward(pooled.data, mean: normMean.data, rstd: normRstd.data, cls.data, n: b)
        let features = Buffer(count: b * pd), normalized = Buffer(count: b * pd), featureNorms = Buffer(count: b)
        head.forward(features.data, pooled.data, n: b)
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
            // features = head(pooled) ; pooled = norm(cls)
            let dPooled = Buffer(count: b * d), dCls = Buffer(count: b * d)
            linearBackward(dinp: dPooled.data, dweight: nil, dbias: nil, dFeatures.data, pooled.data, head.weight.data,
                           n: b, inFeatures: d, outFeatures: pd)
            let g = s.normGrads
            layerNormBackward(dinp: dCls.data, dweight: g.last!.weight.data, dbias: g.last!.bias.data, dPooled.data, cls.data,
                              s.norms.norm.weight.data, mean: normMean.data, rstd: normRstd.data, n: b, c: d)
            // cls = last_block(x)[:, 0]; then the other blocks in reverse
            let dx = Buffer(count: b * t * d)
            encoderLayerBackwardRow(blocks[last], dx: dx.data, dCls.data, row: 0, tape[last], scratch, heads: numHeads, activation: .gelu,
                                    norm1: s.norms.blocks[last].norm1, norm2: s.norms.blocks[last].norm2, g1: g[2 * last], g2: g[2 * last + 1])
            for i in (0..<last).reversed() {
                encoderLayerBackward(blocks[i], dx.data, tape[i], scratch, heads: numHeads, activation: .gelu,
                                     norm1: s.norms.blocks[i].norm1, norm2: s.norms.blocks[i].norm2, g1: g[2 * i], g2: g[2 * i + 1])
            }
            // x = [CLS; prompts; patches + pos_embed]: the prompts' rows
            profiled(.copy) {
                for bi in 0..<b {
                    let src = dx.data + (bi * t + 1) * d
                    for j in 0..<(p * d) { s.promptsGrad.data[j] += src[j] }
                }
            }
            withExtendedLifetime((dHeadInput, dFeatures, dPooled, dCls, dx)) {}
        }
        withExtendedLifetime((tape, x, cls, pooled, normMean, normRstd, features, normalized, featureNorms, logits, dlogits, scratch)) {}
        return value
    }
}
