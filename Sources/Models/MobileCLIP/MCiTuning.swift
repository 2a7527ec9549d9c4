import Kernels

// NoLA's third step on an MCi tower (docs/mobileclip.md). Visual prompt tokens after CLS have no place in a
// convolutional/attention hybrid without a CLS token, so the tuned variant trains the normalisation of the
// last (attention) stage instead: per block its BatchNorm affine (norm.weight, norm.bias; the running
// statistics stay frozen, as in eval mode) and its two layer scales (layer_scale_1.gamma,
// layer_scale_2.gamma), with the method's linear head on the features. Everything below the last stage's
// first block is frozen and runs forward only; the backward runs through head.fc, the pooling,
// final_conv (SE included) and the last stage's blocks, and stops at the first trained tensor.

/// What the backward of the last stage and final_conv needs, for one micro-batch.
final class MCiTuningTape {
    let input: FeatureMap                 // the last stage's blocks' input (after downsample and pos_emb)
    let blockInputs: [Buffer]             // (N,C) input of each block (for norm's gradient)
    let attention: [AttentionTape]
    let mixerOut: [Buffer]                // (N,C) proj output before layer_scale_1
    let mlp: [MlpTape]
    let mlpOut: [Buffer]                  // (N,C) fc2 output before layer_scale_2
    let normScale: [Buffer], normShift: [Buffer]
    // final_conv: y1 = conv(x), y2 = y1 ⊙ gate(y1), y3 = gelu(y2)
    let y1: Buffer, z1: Buffer, gate: Buffer, y2: Buffer
    let pooled: Buffer

    init(_ x: FeatureMap, blocks: Int, hidden: Int, heads: Int, finalChannels: Int, reduced: Int) {
        input = x
        let n = x.rows, d = x.c, t = x.h * x.w
        blockInputs = (0..<blocks).map { _ in Buffer(count: n * d) }
        attention = (0..<blocks).map { _ in AttentionTape(n: n, d: d, b: x.b, heads: heads, t: t) }
        mixerOut = (0..<blocks).map { _ in Buffer(count: n * d) }
        mlp = (0..<blocks).map { _ in MlpTape(n: n, hidden: hidden) }
        mlpOut = (0..<blocks).map { _ in Buffer(count: n * d) }
        normScale = (0..<blocks).map { _ in Buffer(count: d) }
        normShift = (0..<blocks).map { _ in Buffer(count: d) }
        y1 = Buffer(count: n * finalChannels); z1 = Buffer(count: x.b * reduced); gate = Buffer(count: x.b * finalChannels)
        y2 = Buffer(count: n * finalChannels)
        pooled = Buffer(count: x.b * finalChannels)
    }
}

extension MCiModel {
    /// The names of the tuned tensors under the checkpoint's prefix, in order: per block j of the last
    /// stage s, "stages.s.blocks.j.norm.weight", ".norm.bias", ".layer_scale_1.gamma", ".layer_scale_2.gamma".
    public var tunedTensorNames: [String] {
        let s = stages.count - 1
        return stages[s].blocks.indices.flatMap { j in
            ["norm.weight", "norm.bias", "layer_scale_1.gamma", "layer_scale_2.gamma"].map { "stages.\(s).blocks.\(j).\($0)" }
        }
    }

    /// The pretrained values of `tunedTensorNames`, each (C).
    public func initialTunedTensors() -> [[Float]] {
        stages.last!.blocks.flatMap { block -> [[Float]] in
            guard case .attention(let norm, _, _, let s1, _, let s2) = block else { preconditionFailure("the last stage is not an attention stage") }
            return [norm.weight.array, norm.bias.array, s1.array, s2.array]
        }
    }

    /// Whether the tuned variant applies: the last stage is an attention stage (every MCi).
    public var isTunable: Bool {
        stages.last!.blocks.allSatisfy { if case .attention = $0 { return true } else { return false } }
    }

    /// Bytes of activations one image needs in `tuningStep`: the frozen forward's largest stage (a few
    /// maps of H·W·hidden at stage 0) and the tape of the last stage and final_conv.
    public var tuningBytesPerImage: Int {
        let c = config
        var side = c.imageSize / 4, frozen = 0
        for i in c.layers.indices {
            if i > 0 { side /= c.downStride }
            frozen = max(frozen, side * side * (3 * c.embedDims[i] + 2 * c.mlpHidden(i)))
        }
        let t = side * side, d = c.embedDims.last!, blocks = c.layers.last!, heads = d / c.headDim
        let tape = blocks * (t * (6 * d + 2 * c.mlpHidden(c.layers.count - 1)) + heads * t * t) + 4 * t * c.finalFeatures
        return 4 * (frozen + 2 * tape + 3 * c.imageSize * c.imageSize)
    }

    /// Features (B, embed_dim) with the tuned tensors (`tunedTensorNames` order), no gradients.
    public func tunedFeatures(pixels: UnsafePointer<Float>, batch b: Int, tuned: [[Float]]) -> [Float] {
        let s = config.imageSize, e = config.embedDim, image = 3 * s * s
        precondition(tuned.count == tunedTensorNames.count)
        var out = [Float](repeating: 0, count: b * e)
        out.withUnsafeMutableBufferPointer { o in
            let o = o.baseAddress!
            withDenormalsFlushed {
                batchParallel(b) { r in
                    let x = trunkInput(pixels: pixels + r.lowerBound * image, batch: r.count, stages: stages.count, blocksOfLast: 0)
                    let f = tunedForward(x, tuned: tuned, tape: nil)
                    copyFloats(o + r.lowerBound * e, f.data, count: f.count)
                }
            }
        }
        return out
    }

    /// One micro-batch of the tuned variant: features (B, embed_dim) with the tuned tensors, then
    /// `lossGradient(features)` returns dFeatures (B, embed_dim), back-propagated into `gradients`
    /// (ADDED, `tunedTensorNames` order). Frozen weights get no gradients; the backward stops at the last
    /// stage's first block. The tower's kernels run with denormals flushed (`withDenormalsFlushed`), not
    /// `lossGradient`.
    public func tuningStep(pixels: UnsafePointer<Float>, batch b: Int, tuned: [[Float]],
                           lossGradient: ([Float]) -> [Float], gradients: inout [[Float]]) {
        precondition(tuned.count == tunedTensorNames.count && gradients.count == tuned.count)
        let (features, tape) = withDenormalsFlushed { tuningForward(pixels: pixels, batch: b, tuned: tuned) }
        let dFeatures = lossGradient(features.array)
        precondition(dFeatures.count == features.count)
        withDenormalsFlushed {
            withProfilePhase(.backward) { tunedBackward(dFeatures, tape: tape, tuned: tuned, gradients: &gradients) }
        }
    }

    /// The forward of `tuningStep`: features and the tape of the last stage and final_conv.
    func tuningForward(pixels: UnsafePointer<Float>, batch b: Int, tuned: [[Float]]) -> (Buffer, MCiTuningTape) {
        // the frozen part, sub-batches side by side
        let s = config.imageSize, image = 3 * s * s
        let last = stages.count - 1, d = config.embedDims[last]
        let side = trunkOutputSide
        let x = FeatureMap(b: b, h: side, w: side, c: d)
        batchParallel(b) { r in
            let part = trunkInput(pixels: pixels + r.lowerBound * image, batch: r.count, stages: stages.count, blocksOfLast: 0)
            precondition(part.h == side && part.c == d)
            copyFloats(x.data + r.lowerBound * side * side * d, part.data, count: part.count)
        }
        let se = finalConv.se!
        let tape = MCiTuningTape(x, blocks: stages[last].blocks.count, hidden: config.mlpHidden(last), heads: d / config.headDim,
                                 finalChannels: config.finalFeatures, reduced: se.fc1.outFeatures)
        return (tunedForward(FeatureMap(copying: x), tuned: tuned, tape: tape), tape)
    }

    /// The side of the last stage's maps for image_size input.
    var trunkOutputSide: Int {
        var side = config.imageSize
        for unit in stem { side = unit.conv.outputSize(side, side).0 }
        for stage in stages { for unit in stage.downsample { side = unit.conv.outputSize(side, side).0 } }
        return side
    }

    /// The last stage's blocks (tuned tensors), final_conv, pooling, head.fc on x (B,H,W,C), in place.
    func tunedForward(_ x: FeatureMap, tuned: [[Float]], tape: MCiTuningTape?) -> Buffer {
        let n = x.rows, d = x.c
        for (j, block) in stages.last!.blocks.enumerated() {
            guard case .attention(let norm, let qkv, let proj, _, let mlp, _) = block else { preconditionFailure("not an attention stage") }
            let (w, bias, s1, s2) = (tuned[4 * j], tuned[4 * j + 1], tuned[4 * j + 2], tuned[4 * j + 3])
            let (scale, shift) = norm.affine(weight: w, bias: bias)
            if let tape {
                copyFloats(tape.blockInputs[j].data, x.data, count: n * d)
                copyFloats(tape.normScale[j].data, scale.data, count: d)
                copyFloats(tape.normShift[j].data, shift.data, count: d)
            }
            let o = attentionForward(x, norm: (scale, shift), qkv: qkv, proj: proj, tape: tape?.attention[j])
            if let tape { copyFloats(tape.mixerOut[j].data, o.data, count: n * d) }
            scaledResidualForward(x.data, x.data, o.data, s1, n: n, c: d)
            let m = mlpForward(mlp, x, tape: tape?.mlp[j])
            if let tape { copyFloats(tape.mlpOut[j].data, m.data, count: n * d) }
            scaledResidualForward(x.data, x.data, m.data, s2, n: n, c: d)
        }
        guard let tape else { return finalFeatures(x) }
        // final_conv with its intermediates kept: y1 = conv(x); y2 = y1 ⊙ gate(y1); y3 = gelu(y2)
        let fc = finalConv, f = config.finalFeatures, t = x.h * x.w
        fc.conv.forward(tape.y1.data, x.data, b: x.b, h: x.h, w: x.w)
        let g = fc.se!.gate(tape.y1.data, b: x.b, n: t, z1: tape.z1.data)
        copyFloats(tape.gate.data, g.data, count: g.count)
        channelGateForward(tape.y2.data, tape.y1.data, g.data, b: x.b, n: t, c: f)
        let y3 = Buffer(count: n * f), out = Buffer(count: x.b * config.embedDim)
        activationForward(y3.data, tape.y2.data, count: n * f, .gelu)
        meanRowsForward(tape.pooled.data, y3.data, b: x.b, n: t, c: f)
        head.forward(out.data, tape.pooled.data, n: x.b)
        return out
    }

    func tunedBackward(_ dFeatures: [Float], tape: MCiTuningTape, tuned: [[Float]], gradients: inout [[Float]]) {
        let x = tape.input, b = x.b, t = x.h * x.w, n = x.rows, d = x.c, f = config.finalFeatures
        // features = pooled · head.fcᵀ + bias; pooled = mean_hw(y3); y3 = gelu(y2)
        let dPooled = Buffer(count: b * f), dy3 = Buffer(count: n * f), dy2 = Buffer(count: n * f), dy1 = Buffer(count: n * f)
        linearBackward(dinp: dPooled.data, dweight: nil, dbias: nil, dFeatures, tape.pooled.data, head.weight.data,
                       n: b, inFeatures: f, outFeatures: config.embedDim)
        meanRowsBackward(dinp: dy3.data, dPooled.data, b: b, n: t, c: f)
        activationBackward(dinp: dy2.data, dy3.data, tape.y2.data, count: n * f, .gelu)
        // y2 = y1 ⊙ gate(y1); y1 = final_conv.conv(x)
        finalConv.se!.backward(dx: dy1.data, dy2.data, tape.y1.data, gate: tape.gate.data, z1: tape.z1.data, b: b, n: t)
        let dx = Buffer(count: n * d)
        finalConv.conv.backwardInput(dinp: dx.data, dy1.data, b: b, h: x.h, w: x.w)
        withExtendedLifetime((dPooled, dy3, dy2, dy1)) {}

        let blocks = stages.last!.blocks
        for j in blocks.indices.reversed() {
            guard case .attention(let norm, let qkv, let proj, _, let mlp, _) = blocks[j] else { preconditionFailure() }
            let s1 = tuned[4 * j + 2], s2 = tuned[4 * j + 3]
            // x2 = x1 + ls2 ⊙ m: dls2 += Σ dx2 ⊙ m; dm = dx2 ⊙ ls2; dx1 = dx2 + ∂m/∂x1
            let dm = Buffer(count: n * d)
            channelAffineBackward(dinp: nil, dscale: &gradients[4 * j + 3], dshift: nil, dx.data, tape.mlpOut[j].data, s2, n: n, c: d)
            channelScaleBackward(dinp: dm.data, dx.data, s2, n: n, c: d)
            // m = fc2(gelu(h)); h = fc1(c0); c0 = conv(x1)
            let hidden = mlp.fc1.outFeatures
            let dg = Buffer(count: n * hidden), dh = Buffer(count: n * hidden), dc0 = Buffer(count: n * d)
            linearBackward(dinp: dg.data, dweight: nil, dbias: nil, dm.data, dm.data, mlp.fc2.weight.data, n: n, inFeatures: hidden, outFeatures: d)
            activationBackward(dinp: dh.data, dg.data, tape.mlp[j].hidden.data, count: n * hidden, .gelu)
            linearBackward(dinp: dc0.data, dweight: nil, dbias: nil, dh.data, dh.data, mlp.fc1.weight.data, n: n, inFeatures: d, outFeatures: hidden)
            mlp.conv.backwardInput(dinp: dx.data, dc0.data, b: b, h: x.h, w: x.w)   // dx is now dx1
            // x1 = x + ls1 ⊙ o: dls1 += Σ dx1 ⊙ o; do = dx1 ⊙ ls1
            let dO = Buffer(count: n * d)
            channelAffineBackward(dinp: nil, dscale: &gradients[4 * j + 2], dshift: nil, dx.data, tape.mixerOut[j].data, s1, n: n, c: d)
            channelScaleBackward(dinp: dO.data, dx.data, s1, n: n, c: d)
            // o = proj(att); att = attention(qkv); qkv = normed · Wqkvᵀ
            let heads = d / config.headDim
            let dAtt = Buffer(count: n * d), dQKV = Buffer(count: n * 3 * d), dNormed = Buffer(count: n * d)
            linearBackward(dinp: dAtt.data, dweight: nil, dbias: nil, dO.data, dO.data, proj.weight.data, n: n, inFeatures: d, outFeatures: d)
            attentionBackward(dqkv: dQKV.data, dAtt.data, tape.attention[j].qkv.data, probs: tape.attention[j].probs.data,
                              b: b, t: t, d: d, heads: heads)
            linearBackward(dinp: dNormed.data, dweight: nil, dbias: nil, dQKV.data, dQKV.data, qkv.weight.data, n: n, inFeatures: d, outFeatures: 3 * d)
            // normed = x · scale + shift, scale = w/√(var+ε), shift = b − mean·scale:
            // dw = Σ dnormed · (x − mean)/√(var+ε) = (Σ dnormed·x − mean·Σ dnormed)/√(var+ε); db = Σ dnormed
            let dScale = Buffer(count: d), dShift = Buffer(count: d)
            channelAffineBackward(dinp: j > 0 ? dx.data : nil, dscale: dScale.data, dshift: dShift.data, dNormed.data,
                                  tape.blockInputs[j].data, tape.normScale[j].data, n: n, c: d)
            for i in 0..<d {
                let rstd = 1 / (norm.runningVar.data[i] + norm.eps).squareRoot()
                gradients[4 * j][i] += rstd * (dScale.data[i] - norm.runningMean.data[i] * dShift.data[i])
                gradients[4 * j + 1][i] += dShift.data[i]
            }
            withExtendedLifetime((dm, dg, dh, dc0, dO, dAtt, dQKV, dNormed, dScale, dShift)) {}
        }
        withExtendedLifetime(dx) {}
    }
}

extension FeatureMap {
    convenience init(copying x: FeatureMap) {
        self.init(b: x.b, h: x.h, w: x.w, c: x.c)
        copyFloats(data, x.data, count: count)
    }
}
