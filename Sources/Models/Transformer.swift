import Kernels

/// A LayerNorm's parameters ((C) weight and bias) and epsilon.
public struct LayerNorm: @unchecked Sendable {
    public let weight: Buffer
    public let bias: Buffer
    public let eps: Float
    var c: Int { weight.count }

    func forward(_ out: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>?, rstd: UnsafeMutablePointer<Float>?,
                 _ inp: UnsafePointer<Float>, n: Int) {
        layerNormForward(out, mean: mean, rstd: rstd, inp, weight.data, bias.data, n: n, c: c, eps: eps)
    }

    /// A copy with its own buffers (a trainable LayerNorm starting from this one).
    func copy() -> LayerNorm { LayerNorm(weight: Buffer(weight.array), bias: Buffer(bias.array), eps: eps) }
}

/// A Linear layer: weight (OUT,IN) as in Hugging Face checkpoints, optional bias (OUT).
public struct Linear: @unchecked Sendable {
    public let weight: Buffer
    public let bias: Buffer?
    public let inFeatures: Int
    public let outFeatures: Int

    func forward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, n: Int) {
        linearForward(out, inp, weight.data, bias?.data, n: n, inFeatures: inFeatures, outFeatures: outFeatures)
    }
}

/// One pre-norm transformer encoder layer, the block shared by CLIP (`encoder.layers.i`: layer_norm1,
/// self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2), ViT (`encoder.layer.i`: layernorm_before,
/// attention.attention.{query,key,value}, attention.output.dense, layernorm_after, intermediate.dense,
/// output.dense) and DINOv2 (norm1, attention…, layer_scale1, norm2, mlp.fc1/fc2, layer_scale2):
///   x = x + scale1 ⊙ out(attention(qkv(norm1(x))))
///   x = x + scale2 ⊙ fc2(act(fc1(norm2(x))))
/// q, k and v are packed into one (3D,D) projection.
public struct EncoderLayer: @unchecked Sendable {
    let norm1: LayerNorm
    let qkv: Linear
    let out: Linear
    let scale1: Buffer?
    let norm2: LayerNorm
    let fc1: Linear
    let fc2: Linear
    let scale2: Buffer?
    var d: Int { out.outFeatures }
    var intermediate: Int { fc1.outFeatures }
}

/// Activations of one encoder layer on (B,T) tokens. For inference one set is reused by every
/// layer; for training each layer keeps its own (`keepsInputs`), as the backward needs them.
final class LayerActivations {
    let b: Int, t: Int, d: Int, heads: Int, intermediate: Int
    let keepsInputs: Bool
    let input: Buffer   // (N,D) layer input (training only)
    let ln1: Buffer, mean1: Buffer, rstd1: Buffer
    let qkv: Buffer     // (N,3D)
    let probs: Buffer   // (B,H,T,T) softmax of the scores (training only: the backward's; inference keeps none)
    let att: Buffer     // (N,D)
    /// (N,D) the projection before its layer scale (DINOv2): made on first use, so a layer without a layer
    /// scale (CLIP, ViT) never allocates it — for training that is one (N,D) buffer less per layer.
    lazy var scaleScratch = Buffer(count: b * t * d)
    let mid: Buffer     // (N,D) x after the attention residual (training only)
    let ln2: Buffer, mean2: Buffer, rstd2: Buffer
    let fc1: Buffer     // (N,I) before the activation
    let act: Buffer     // (N,I) after it (training only; inference activates in place)

    init(b: Int, t: Int, d: Int, heads: Int, intermediate: Int, keepsInputs: Bool) {
        self.b = b; self.t = t; self.d = d; self.heads = heads; self.intermediate = intermediate
        self.keepsInputs = keepsInputs
        let n = b * t
        input = Buffer(count: keepsInputs ? n * d : 0)
        ln1 = Buffer(count: n * d); mean1 = Buffer(count: n); rstd1 = Buffer(count: n)
        qkv = Buffer(count: n * 3 * d)
        probs = Buffer(count: keepsInputs ? b * heads * t * t : 0)
        att = Buffer(count: n * d)
        mid = Buffer(count: keepsInputs ? n * d : 0)
        ln2 = Buffer(count: n * d); mean2 = Buffer(count: n); rstd2 = Buffer(count: n)
        fc1 = Buffer(count: n * intermediate)
        act = Buffer(count: keepsInputs ? n * intermediate : 0)
    }
}

/// x (B,T,D) ← layer(x), in place. norm1/norm2 default to the layer's own (prompt tuning passes trained ones).
/// Each residual add is folded into the GEMM of the projection before it (β = 1 onto residual + bias), or,
/// with a layer scale, done in the same pass as the scale.
func encoderLayerForward(_ layer: EncoderLayer, _ x: UnsafeMutablePointer<Float>, _ a: LayerActivations,
                         heads: Int, activation: Activation, causal: Bool,
                         norm1: LayerNorm? = nil, norm2: LayerNorm? = nil) {
    let n = a.b * a.t, d = layer.d
    if a.keepsInputs { copyFloats(a.input.data, x, count: n * d) }
    (norm1 ?? layer.norm1).forward(a.ln1.data, mean: a.mean1.data, rstd: a.rstd1.data, x, n: n)
    layer.qkv.forward(a.qkv.data, a.ln1.data, n: n)
    attentionForward(a.att.data, probs: a.keepsInputs ? a.probs.data : nil, a.qkv.data, b: a.b, t: a.t, d: d, heads: heads,
                     causal: causal)
    // mid = x + scale1 ⊙ out(att): kept for the backward when training, else x itself
    let mid = a.keepsInputs ? a.mid.data : x
    residualProjection(layer.out, scale: layer.scale1, mid, residual: x, a.att.data, a, n: n)
    mlpForward(layer, x, input: mid, a, n: n, activation: activation, norm2: norm2)
}

/// out (n,OUT) = residual + scale ⊙ linear(inp), out may alias residual; `a.scaleScratch` (n ≤ B·T rows of
/// OUT = D) holds the projection when there is a layer scale.
private func residualProjection(_ linear: Linear, scale: Buffer?, _ out: UnsafeMutablePointer<Float>, residual: UnsafePointer<Float>,
                                _ inp: UnsafePointer<Float>, _ a: LayerActivations, n: Int) {
    if let scale {
        let scratch = a.scaleScratch.data
        linear.forward(scratch, inp, n: n)
        scaledResidualForward(out, residual, scratch, scale.data, n: n, c: linear.outFeatures)
    } else {
        linearForwardAdding(out, residual: residual, inp, linear.weight.data, linear.bias?.data,
                            n: n, inFeatures: linear.inFeatures, outFeatures: linear.outFeatures)
    }
}

/// The MLP half of a layer on n rows: out (n,D) = input + scale2 · fc2(act(fc1(norm2(input)))), input (n,D),
/// out may alias input; shared by the full layer and the row-only last layer.
private func mlpForward(_ layer: EncoderLayer, _ out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                        _ a: LayerActivations, n: Int, activation: Activation, norm2: LayerNorm?) {
    let d = layer.d, inter = layer.intermediate
    (norm2 ?? layer.norm2).forward(a.ln2.data, mean: a.mean2.data, rstd: a.rstd2.data, input, n: n)
    let hidden = a.keepsInputs ? a.act.data : a.fc1.data
    linearForward(a.fc1.data, a.ln2.data, layer.fc1.weight.data, nil, n: n, inFeatures: d, outFeatures: inter)
    biasActivationForward(hidden, a.fc1.data, layer.fc1.bias!.data, n: n, c: inter, activation)
    residualProjection(layer.fc2, scale: layer.scale2, out, residual: input, hidden, a, n: n)
}

/// The last layer when only one output row per sequence is used (CLS row 0, or a text's EOS row t−1):
/// k and v for every token, everything else for that row only. x (B,T,D) is read; returns (B,D).
/// When `a.keepsInputs`, `a` keeps what encoderLayerBackwardRow needs (row-only parts in its first B rows).
func encoderLayerForwardRow(_ layer: EncoderLayer, _ x: UnsafePointer<Float>, row: Int, _ a: LayerActivations,
                            heads: Int, activation: Activation, causal: Bool,
                            norm1: LayerNorm? = nil, norm2: LayerNorm? = nil) -> Buffer {
    let b = a.b, t = a.t, n = b * t, d = layer.d
    let y = Buffer(count: b * d), midBuffer = a.keepsInputs ? a.mid : Buffer(count: b * d)
    let mid = midBuffer.data
    if a.keepsInputs { copyFloats(a.input.data, x, count: n * d) }
    (norm1 ?? layer.norm1).forward(a.ln1.data, mean: a.mean1.data, rstd: a.rstd1.data, x, n: n)
    layer.qkv.forward(a.qkv.data, a.ln1.data, n: n)
    attentionForward(a.att.data, probs: a.keepsInputs ? a.probs.data : nil, a.qkv.data, b: b, t: t, d: d, heads: heads,
                     causal: causal, onlyRow: row)
    // mid (B,D) = x[:, row] + scale1 ⊙ out(att)
    for bi in 0..<b { copyFloats(mid + bi * d, x + (bi * t + row) * d, count: d) }
    residualProjection(layer.out, scale: layer.scale1, mid, residual: mid, a.att.data, a, n: b)
    mlpForward(layer, y.data, input: mid, a, n: b, activation: activation, norm2: norm2)
    withExtendedLifetime(midBuffer) {}
    return y
}

/// Gradient buffers of one layer's two LayerNorms (the only layer weights prompt tuning trains).
struct LayerNormGrads {
    let weight: Buffer
    let bias: Buffer
}

/// Scratch for encoderLayerBackward, sized for (B,T) tokens.
final class LayerGradScratch {
    let dm: Buffer, dln: Buffer, datt: Buffer, dqkv: Buffer, dhidden: Buffer, dfc1: Buffer
    init(n: Int, d: Int, intermediate: Int) {
        dm = Buffer(count: n * d); dln = Buffer(count: n * d); datt = Buffer(count: n * d)
        dqkv = Buffer(count: n * 3 * d); dhidden = Buffer(count: n * intermediate); dfc1 = Buffer(count: n * intermediate)
    }
}

/// The gradient of a projection whose output is scaled by `scale` before the residual add: dout · scale in
/// scratch (n,D), or dout itself without a layer scale (no copy).
private func scaledGradient(_ dout: UnsafePointer<Float>, _ scale: Buffer?, scratch: UnsafeMutablePointer<Float>,
                            n: Int, d: Int) -> UnsafePointer<Float> {
    guard let scale else { return dout }
    zeroFloats(scratch, count: n * d)
    channelScaleBackward(dinp: scratch, dout, scale.data, n: n, c: d)
    return UnsafePointer(scratch)
}

/// Backward of encoderLayerForwardRow: from dy (B,D), the gradient of its output, writes dx (B,T,D), the
/// gradient of its input x; LayerNorm weight/bias gradients accumulate into g1, g2.
func encoderLayerBackwardRow(_ layer: EncoderLayer, dx: UnsafeMutablePointer<Float>, _ dy: UnsafePointer<Float>, row: Int,
                             _ a: LayerActivations, _ s: LayerGradScratch, heads: Int, activation: Activation,
                             norm1: LayerNorm, norm2: LayerNorm, g1: LayerNormGrads, g2: LayerNormGrads) {
    withProfilePhase(.backward) {
        precondition(a.keepsInputs)
        let b = a.b, t = a.t, n = b * t, d = layer.d, inter = layer.intermediate
        let dmid = Buffer(count: b * d)
        // y = mid + scale2 ⊙ fc2(act(fc1(norm2(mid)))), one row per sequence
        copyFloats(dmid.data, dy, count: b * d)
        let dm = scaledGradient(dy, layer.scale2, scratch: s.dm.data, n: b, d: d)
        linearBackward(dinp: s.dhidden.data, dweight: nil, dbias: nil, dm, a.act.data, layer.fc2.weight.data, n: b, inFeatures: inter, outFeatures: d,
                       accumulate: false)
        activationBackward(dinp: s.dfc1.data, s.dhidden.data, a.fc1.data, count: b * inter, activation, accumulate: false)
        linearBackward(dinp: s.dln.data, dweight: nil, dbias: nil, s.dfc1.data, a.ln2.data, layer.fc1.weight.data, n: b, inFeatures: d, outFeatures: inter,
                       accumulate: false)
        layerNormBackward(dinp: dmid.data, dweight: g2.weight.data, dbias: g2.bias.data, s.dln.data, a.mid.data, norm2.weight.data,
                          mean: a.mean2.data, rstd: a.rstd2.data, n: b, c: d)
        // mid = x[:, row] + scale1 ⊙ out(attention_row(qkv(norm1(x))))
        let dm1 = scaledGradient(dmid.data, layer.scale1, scratch: s.dm.data, n: b, d: d)
        linearBackward(dinp: s.datt.data, dweight: nil, dbias: nil, dm1, a.att.data, layer.out.weight.data, n: b, inFeatures: d, outFeatures: d,
                       accumulate: false)
        s.dqkv.zero()   // dq is written for the one row only
        attentionBackward(dqkv: s.dqkv.data, s.datt.data, a.qkv.data, probs: a.probs.data, b: b, t: t, d: d, heads: heads, onlyRow: row)
        linearBackward(dinp: s.dln.data, dweight: nil, dbias: nil, s.dqkv.data, a.ln1.data, layer.qkv.weight.data, n: n, inFeatures: d, outFeatures: 3 * d,
                       accumulate: false)
        zeroFloats(dx, count: n * d)
        for bi in 0..<b { copyFloats(dx + (bi * t + row) * d, dmid.data + bi * d, count: d) }
        layerNormBackward(dinp: dx, dweight: g1.weight.data, dbias: g1.bias.data, s.dln.data, a.input.data, norm1.weight.data,
                          mean: a.mean1.data, rstd: a.rstd1.data, n: n, c: d)
        withExtendedLifetime(dmid) {}
    }
}

/// Backward of encoderLayerForward: dx (B,T,D) holds ∂L/∂output on entry and ∂L/∂input on return.
/// Frozen weights get no gradients; the two LayerNorms' weight/bias gradients accumulate into g1, g2.
func encoderLayerBackward(_ layer: EncoderLayer, _ dx: UnsafeMutablePointer<Float>, _ a: LayerActivations,
                          _ s: LayerGradScratch, heads: Int, activation: Activation,
                          norm1: LayerNorm, norm2: LayerNorm, g1: LayerNormGrads, g2: LayerNormGrads) {
    withProfilePhase(.backward) {
        precondition(a.keepsInputs)
        let n = a.b * a.t, d = layer.d, inter = layer.intermediate
        // x = mid + scale2 ⊙ fc2(act(fc1(norm2(mid)))): dmid = dx + …
        // Every gradient buffer below is written whole by its first kernel (accumulate: false): none is zeroed.
        let dm = scaledGradient(dx, layer.scale2, scratch: s.dm.data, n: n, d: d)
        linearBackward(dinp: s.dhidden.data, dweight: nil, dbias: nil, dm, a.act.data, layer.fc2.weight.data, n: n, inFeatures: inter, outFeatures: d,
                       accumulate: false)
        activationBackward(dinp: s.dfc1.data, s.dhidden.data, a.fc1.data, count: n * inter, activation, accumulate: false)
        linearBackward(dinp: s.dln.data, dweight: nil, dbias: nil, s.dfc1.data, a.ln2.data, layer.fc1.weight.data, n: n, inFeatures: d, outFeatures: inter,
                       accumulate: false)
        layerNormBackward(dinp: dx, dweight: g2.weight.data, dbias: g2.bias.data, s.dln.data, a.mid.data, norm2.weight.data,
                          mean: a.mean2.data, rstd: a.rstd2.data, n: n, c: d)
        // mid = input + scale1 ⊙ out(attention(qkv(norm1(input))))
        let dm1 = scaledGradient(dx, layer.scale1, scratch: s.dm.data, n: n, d: d)
        linearBackward(dinp: s.datt.data, dweight: nil, dbias: nil, dm1, a.att.data, layer.out.weight.data, n: n, inFeatures: d, outFeatures: d,
                       accumulate: false)
        attentionBackward(dqkv: s.dqkv.data, s.datt.data, a.qkv.data, probs: a.probs.data, b: a.b, t: a.t, d: d, heads: heads, accumulate: false)
        linearBackward(dinp: s.dln.data, dweight: nil, dbias: nil, s.dqkv.data, a.ln1.data, layer.qkv.weight.data, n: n, inFeatures: d, outFeatures: 3 * d,
                       accumulate: false)
        layerNormBackward(dinp: dx, dweight: g1.weight.data, dbias: g1.bias.data, s.dln.data, a.input.data, norm1.weight.data,
                          mean: a.mean1.data, rstd: a.rstd1.data, n: n, c: d)
    }
}
