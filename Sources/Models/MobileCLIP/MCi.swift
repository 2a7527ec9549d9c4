import Foundation
import Kernels

// MobileCLIP's MCi image towers (S0/S1/S2: timm `fastvit_mci0/1/2`) as open_clip runs them: a timm FastVit
// trunk whose classifier head is the CLIP projection (open_clip's TimmModel with timm_proj null), so
// encode_image(x) = head.fc(mean(final_conv(stages(stem(x))))).
// Every convolution is held in its inference form: a training-form checkpoint (MobileOneBlock branches
// conv_kxk / conv_scale / identity, ReparamLargeKernelConv large_conv + small_conv, RepMixer norm / mixer /
// layer_scale, RepCPE pos_enc, ConvMlp conv + bn) is folded at load exactly as timm's `reparameterize()`
// does; an inference-form checkpoint (`reparam_conv`) is read as it is. Activations are channels-last
// (B,H,W,C) rows (Kernels/Convolution.swift).

/// The architecture of one MCi tower (timm `fastvit_mci*` arguments).
public struct MCiConfig: Sendable, Equatable {
    public enum TokenMixer: String, Sendable { case repmixer, attention }
    public var layers: [Int]
    public var embedDims: [Int]
    public var mlpRatios: [Double]
    public var seDownsamples: [Bool]
    public var tokenMixers: [TokenMixer]
    /// A 7×7 RepCPE before the stage's blocks.
    public var posEmbs: [Bool]
    /// GELU after the downsampling's large-kernel conv (true for every MCi).
    public var lkcUseAct = true
    public var downPatchSize = 7, downStride = 2, repmixerKernelSize = 3
    /// final_conv widens the last stage by this factor.
    public var clsRatio = 2
    /// Width of the head's output: open_clip's embed_dim.
    public var embedDim = 512
    public var headDim = 32
    public var imageSize = 256
    public var batchNormEps: Float = 1e-5

    public init(layers: [Int], embedDims: [Int], mlpRatios: [Double], seDownsamples: [Bool], tokenMixers: [TokenMixer],
                posEmbs: [Bool], embedDim: Int = 512, imageSize: Int = 256) {
        precondition([embedDims.count, mlpRatios.count, seDownsamples.count, tokenMixers.count, posEmbs.count].allSatisfy { $0 == layers.count })
        self.layers = layers; self.embedDims = embedDims; self.mlpRatios = mlpRatios; self.seDownsamples = seDownsamples
        self.tokenMixers = tokenMixers; self.posEmbs = posEmbs; self.embedDim = embedDim; self.imageSize = imageSize
    }

    /// timm's fastvit_mci0 / 1 / 2 (MobileCLIP S0 / S1 / S2 and MobileCLIP2-S0 / S2), or nil for another name.
    public init?(timmModelName name: String, embedDim: Int = 512, imageSize: Int = 256) {
        let attention: [TokenMixer] = [.repmixer, .repmixer, .repmixer, .attention]
        let se = [false, false, true, true], pos = [false, false, false, true], mlp: [Double] = [3, 3, 3, 3]
        switch name {
        case "fastvit_mci0": self.init(layers: [2, 6, 10, 2], embedDims: [64, 128, 256, 512], mlpRatios: mlp, seDownsamples: se,
                                       tokenMixers: attention, posEmbs: pos, embedDim: embedDim, imageSize: imageSize)
        case "fastvit_mci1": self.init(layers: [4, 12, 20, 4], embedDims: [64, 128, 256, 512], mlpRatios: mlp, seDownsamples: se,
                                       tokenMixers: attention, posEmbs: pos, embedDim: embedDim, imageSize: imageSize)
        case "fastvit_mci2": self.init(layers: [4, 12, 24, 4], embedDims: [80, 160, 320, 640], mlpRatios: mlp, seDownsamples: se,
                                       tokenMixers: attention, posEmbs: pos, embedDim: embedDim, imageSize: imageSize)
        default: return nil
        }
    }

    public static let supportedTimmModels = ["fastvit_mci0", "fastvit_mci1", "fastvit_mci2"]

    /// Channels out of final_conv (what the head reads).
    public var finalFeatures: Int { embedDims.last! * clsRatio }
    func mlpHidden(_ stage: Int) -> Int { Int(Double(embedDims[stage]) * mlpRatios[stage]) }
}

/// A convolution in inference form: dense (groups 1) or depthwise (one input channel per group, `multiplier`
/// outputs each), with bias. PyTorch's padding rule of timm's `create_conv2d`: ((stride − 1) + (k − 1)) / 2.
struct Conv2d: @unchecked Sendable {
    enum Kind: Equatable { case dense, depthwise(multiplier: Int) }
    let kind: Kind
    let inChannels: Int, outChannels: Int, kernel: Int, stride: Int, padding: Int
    /// dense: (OC, C·k·k), the Conv2d weight flattened; depthwise: (k, k, OC), transposed taps-major.
    let weight: Buffer
    let bias: Buffer

    /// From a folded PyTorch weight (OC, C/groups, k, k) and bias (OC).
    init(_ f: FoldedConv, inChannels: Int, stride: Int) {
        self.inChannels = inChannels
        outChannels = f.outChannels
        kernel = f.kernel
        self.stride = stride
        padding = ((stride - 1) + (f.kernel - 1)) / 2
        bias = Buffer(f.bias)
        let kk = f.kernel * f.kernel
        if f.inPerGroup == inChannels && !(inChannels == 1 && f.outChannels > 1) {
            kind = .dense
            weight = Buffer(f.weight)
        } else {
            precondition(f.inPerGroup == 1 && f.outChannels % inChannels == 0)
            kind = .depthwise(multiplier: f.outChannels / inChannels)
            var t = [Float](repeating: 0, count: f.weight.count)
            for o in 0..<f.outChannels { for j in 0..<kk { t[j * f.outChannels + o] = f.weight[o * kk + j] } }
            weight = Buffer(t)
        }
    }

    func outputSize(_ h: Int, _ w: Int) -> (Int, Int) {
        (convOutputSize(h, kernel: kernel, stride: stride, padding: padding), convOutputSize(w, kernel: kernel, stride: stride, padding: padding))
    }

    /// out (B,OH,OW,OC) = conv(inp (B,H,W,C)), or act(conv(inp)) with `activation`: a depthwise convolution
    /// applies it as it stores each output, a dense one with its bias in one pass after the GEMM.
    func forward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, b: Int, h: Int, w: Int, activation: Activation? = nil) {
        switch kind {
        case .dense:
            if kernel == 1 && stride == 1 {
                linearForward(out, inp, weight.data, activation == nil ? bias.data : nil, n: b * h * w, inFeatures: inChannels, outFeatures: outChannels)
            } else {
                conv2dForward(out, inp, weight.data, activation == nil ? bias.data : nil, b: b, h: h, w: w, c: inChannels, outChannels: outChannels,
                              kernel: kernel, stride: stride, padding: padding)
            }
            if let activation {
                let (oh, ow) = outputSize(h, w)
                biasActivationForward(out, out, bias.data, n: b * oh * ow, c: outChannels, activation)
            }
        case .depthwise(let m):
            if m == 1 {
                depthwiseConv2dForward(out, inp, weight.data, bias.data, b: b, h: h, w: w, c: outChannels, kernel: kernel, stride: stride,
                                       padding: padding, activation: activation)
            } else {
                let wide = Buffer(uninitializedCount: b * h * w * outChannels)
                repeatChannelsForward(wide.data, inp, n: b * h * w, c: inChannels, multiplier: m)
                depthwiseConv2dForward(out, wide.data, weight.data, bias.data, b: b, h: h, w: w, c: outChannels, kernel: kernel, stride: stride,
                                       padding: padding, activation: activation)
            }
        }
    }

    /// dinp (B,H,W,C) += ∂/∂inp from dout (B,OH,OW,OC); the weights are frozen. Depthwise only (the tuned
    /// variant back-propagates through depthwise and 1×1 convolutions alone).
    func backwardInput(dinp: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, b: Int, h: Int, w: Int) {
        switch kind {
        case .dense where kernel == 1 && stride == 1:
            linearBackward(dinp: dinp, dweight: nil, dbias: nil, dout, dout, weight.data, n: b * h * w, inFeatures: inChannels, outFeatures: outChannels)
        case .dense:
            preconditionFailure("no backward for a dense \(kernel)×\(kernel) convolution")
        case .depthwise(let m):
            if m == 1 {
                depthwiseConv2dBackward(dinp: dinp, dout, weight.data, b: b, h: h, w: w, c: outChannels, kernel: kernel, stride: stride, padding: padding)
            } else {
                let wide = Buffer(count: b * h * w * outChannels)
                depthwiseConv2dBackward(dinp: wide.data, dout, weight.data, b: b, h: h, w: w, c: outChannels, kernel: kernel, stride: stride, padding: padding)
                repeatChannelsBackward(dinp: dinp, wide.data, n: b * h * w, c: inChannels, multiplier: m)
            }
        }
    }
}

/// A PyTorch convolution weight (OC, C/groups, k, k) with a bias, while branches are folded together.
struct FoldedConv {
    let outChannels: Int, inPerGroup: Int, kernel: Int
    var weight: [Float]
    var bias: [Float]

    init(outChannels: Int, inPerGroup: Int, kernel: Int) {
        self.outChannels = outChannels; self.inPerGroup = inPerGroup; self.kernel = kernel
        weight = [Float](repeating: 0, count: outChannels * inPerGroup * kernel * kernel)
        bias = [Float](repeating: 0, count: outChannels)
    }

    /// self += other, other's (smaller, odd) kernel centred in self's: RepVGG's padding of a 1×1 / 3×3 branch.
    mutating func add(_ other: FoldedConv, scale: Float = 1) {
        precondition(other.outChannels == outChannels && other.inPerGroup == inPerGroup && other.kernel <= kernel)
        let off = (kernel - other.kernel) / 2, k = kernel, ks = other.kernel
        for o in 0..<outChannels {
            bias[o] += scale * other.bias[o]
            for i in 0..<inPerGroup { for y in 0..<ks { for x in 0..<ks {
                weight[((o * inPerGroup + i) * k + y + off) * k + x + off] += scale * other.weight[((o * inPerGroup + i) * ks + y) * ks + x]
            } } }
        }
    }
}

/// Squeeze-and-excitation (timm SEModule): x · σ(fc2(relu(fc1(mean_hw(x))))), fc1/fc2 1×1 convs with bias.
struct SqueezeExcite: @unchecked Sendable {
    let fc1: Linear   // se.fc1 (R,C,1,1) as (R,C)
    let fc2: Linear   // se.fc2 (C,R,1,1) as (C,R)

    /// The gate (B,C) of x (B,N,C); with `tape`, z1 (B,R) before the ReLU is kept for the backward.
    func gate(_ x: UnsafePointer<Float>, b: Int, n: Int, z1 keep: UnsafeMutablePointer<Float>? = nil) -> Buffer {
        let c = fc1.inFeatures, r = fc1.outFeatures
        let s = Buffer(count: b * c), z1 = Buffer(count: b * r), g = Buffer(count: b * c)
        meanRowsForward(s.data, x, b: b, n: n, c: c)
        fc1.forward(z1.data, s.data, n: b)
        keep?.update(from: z1.data, count: b * r)
        for i in 0..<(b * r) { z1.data[i] = max(0, z1.data[i]) }
        fc2.forward(g.data, z1.data, n: b)
        for i in 0..<(b * c) { g.data[i] = 1 / (1 + exp(-g.data[i])) }
        withExtendedLifetime((s, z1)) {}
        return g
    }

    /// Backward of y = x ⊙ gate(x) for x, accumulating dx (B,N,C) += ∂/∂x given dy, x, the gate and z1.
    func backward(dx: UnsafeMutablePointer<Float>, _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                  gate g: UnsafePointer<Float>, z1: UnsafePointer<Float>, b: Int, n: Int) {
        let c = fc1.inFeatures, r = fc1.outFeatures
        let dg = Buffer(count: b * c), dr = Buffer(count: b * r), ds = Buffer(count: b * c)
        channelGateBackward(dinp: dx, dgate: dg.data, dy, x, g, b: b, n: n, c: c)
        // g = σ(z2): dz2 = dg · g(1 − g), written over dg
        for i in 0..<(b * c) { dg.data[i] *= g[i] * (1 - g[i]) }
        linearBackward(dinp: dr.data, dweight: nil, dbias: nil, dg.data, dg.data, fc2.weight.data, n: b, inFeatures: r, outFeatures: c)
        for i in 0..<(b * r) where z1[i] <= 0 { dr.data[i] = 0 }
        linearBackward(dinp: ds.data, dweight: nil, dbias: nil, dr.data, dr.data, fc1.weight.data, n: b, inFeatures: c, outFeatures: r)
        meanRowsBackward(dinp: dx, ds.data, b: b, n: n, c: c)
        withExtendedLifetime((dg, dr, ds)) {}
    }
}

/// conv → SE → GELU: a MobileOneBlock or a ReparamLargeKernelConv in inference form (either may lack SE or act).
struct ConvUnit: @unchecked Sendable {
    let conv: Conv2d
    let se: SqueezeExcite?
    let gelu: Bool

    /// Without SE the GELU is fused into the convolution; SE's gate reads the convolution's output first.
    func forward(_ x: FeatureMap) -> FeatureMap {
        let (oh, ow) = conv.outputSize(x.h, x.w)
        let y = FeatureMap(b: x.b, h: oh, w: ow, c: conv.outChannels)
        guard let se else {
            conv.forward(y.data, x.data, b: x.b, h: x.h, w: x.w, activation: gelu ? .gelu : nil)
            return y
        }
        conv.forward(y.data, x.data, b: x.b, h: x.h, w: x.w)
        let g = se.gate(y.data, b: y.b, n: oh * ow)
        channelGateForward(y.data, y.data, g.data, b: y.b, n: oh * ow, c: y.c)
        if gelu { activationForward(y.data, y.data, count: y.count, .gelu) }
        return y
    }
}

/// Activations (B,H,W,C), channels-last. Left uninitialised: every producer writes the whole map.
final class FeatureMap: @unchecked Sendable {
    let b: Int, h: Int, w: Int, c: Int
    let buffer: Buffer
    var data: UnsafeMutablePointer<Float> { buffer.data }
    var count: Int { b * h * w * c }
    var rows: Int { b * h * w }
    init(b: Int, h: Int, w: Int, c: Int) {
        self.b = b; self.h = h; self.w = w; self.c = c
        buffer = Buffer(uninitializedCount: b * h * w * c)
    }
}

/// ConvMlp: 7×7 depthwise conv + BatchNorm (folded), fc1 (1×1), GELU, fc2 (1×1).
struct ConvMlp: @unchecked Sendable {
    let conv: Conv2d
    let fc1: Linear, fc2: Linear

    /// fc2 with a layer scale folded in: weight rows and bias times scale[o], so that
    /// x + scale ⊙ fc2(g) = x + fc2′(g) (the RepMixer blocks' frozen layer_scale).
    func scaledFC2(_ scale: Buffer) -> Linear {
        let o = fc2.outFeatures, i = fc2.inFeatures
        let w = Buffer(uninitializedCount: o * i), b = Buffer(uninitializedCount: o)
        for r in 0..<o {
            let g = scale.data[r]
            for j in 0..<i { w.data[r * i + j] = fc2.weight.data[r * i + j] * g }
            b.data[r] = (fc2.bias?.data[r] ?? 0) * g
        }
        return Linear(weight: w, bias: b, inFeatures: i, outFeatures: o)
    }
}

/// A BatchNorm2d in eval mode as a per-channel affine: scale = γ/√(var+ε), shift = β − mean·scale.
/// Kept with its γ, β and statistics where it is trained (the attention blocks' `norm`).
struct BatchNorm: @unchecked Sendable {
    let weight: Buffer, bias: Buffer, runningMean: Buffer, runningVar: Buffer
    let eps: Float
    var c: Int { weight.count }
    /// (scale, shift) for these γ, β.
    func affine(weight w: UnsafePointer<Float>, bias b: UnsafePointer<Float>) -> (Buffer, Buffer) {
        let scale = Buffer(count: c), shift = Buffer(count: c)
        for i in 0..<c {
            scale.data[i] = w[i] / (runningVar.data[i] + eps).squareRoot()
            shift.data[i] = b[i] - runningMean.data[i] * scale.data[i]
        }
        return (scale, shift)
    }
}

enum MCiBlock: @unchecked Sendable {
    /// x = reparam_conv(x) (the token mixer: x + layer_scale·(mixer(x) − norm(x)) folded); x = x + layer_scale·mlp(x),
    /// run as x + fc2′(gelu(fc1(conv(x)))) with `scaledFC2` = layer_scale·fc2 (folded at load).
    case repmixer(tokenMixer: Conv2d, mlp: ConvMlp, layerScale: Buffer, scaledFC2: Linear)
    /// x = x + layer_scale_1·proj(attention(qkv(norm(x)))); x = x + layer_scale_2·mlp(x)
    case attention(norm: BatchNorm, qkv: Linear, proj: Linear, layerScale1: Buffer, mlp: ConvMlp, layerScale2: Buffer)
}

struct MCiStage: @unchecked Sendable {
    let downsample: [ConvUnit]   // downsample.proj.0 (large kernel), .1 (1×1); empty without downsampling
    let posEmb: Conv2d?          // pos_emb (RepCPE, identity folded in)
    let blocks: [MCiBlock]
}

/// An MCi tower: stem, stages, final_conv, head.fc. Weights are immutable after loading.
public final class MCiModel: @unchecked Sendable {
    public let config: MCiConfig
    let stem: [ConvUnit]
    let stages: [MCiStage]
    let finalConv: ConvUnit
    let head: Linear
    /// Whether the checkpoint came in the training form (branches folded at load) or the inference form.
    public let loadedTrainingForm: Bool

    /// Loads the trunk under `prefix` ("visual.trunk." in an open_clip checkpoint) from `weights`, in either
    /// form; nil weights: random (benchmarks). Tensors under the prefix that the tower does not read
    /// (other than BatchNorm's num_batches_tracked) throw `unexpectedTensor`; missing or misshapen ones
    /// throw `missingTensor` / `shapeMismatch` with the checkpoint's name.
    public init(config c: MCiConfig, weights: TensorSource?, prefix: String = "visual.trunk.") throws {
        config = c
        var w = WeightReader(weights, prefix: prefix)
        // The form is the stem's: timm reparameterises a whole model at once.
        let training = weights != nil && weights!.shape(of: prefix + "stem.0.reparam_conv.weight") == nil
        loadedTrainingForm = training
        var loader = MCiLoader(reader: w, training: training, eps: c.batchNormEps)
        let e0 = c.embedDims[0]
        stem = [
            try loader.mobileOne("stem.0", in: 3, out: e0, kernel: 3, stride: 2, depthwise: false, se: false, act: true),
            try loader.mobileOne("stem.1", in: e0, out: e0, kernel: 3, stride: 2, depthwise: true, se: false, act: true),
            try loader.mobileOne("stem.2", in: e0, out: e0, kernel: 1, stride: 1, depthwise: false, se: false, act: true),
        ]
        var stages: [MCiStage] = []
        var prev = e0
        for i in 0..<c.layers.count {
            let n = "stages.\(i)", d = c.embedDims[i]
            var downsample: [ConvUnit] = []
            if i > 0 || prev != d {  // timm: downsamples (False, True, True, True) or a change of width
                downsample = [
                    try loader.largeKernel(n + ".downsample.proj.0", in: prev, out: d, kernel: c.downPatchSize, stride: c.downStride,
                                           se: c.seDownsamples[i], act: c.lkcUseAct),
                    try loader.mobileOne(n + ".downsample.proj.1", in: d, out: d, kernel: 1, stride: 1, depthwise: false, se: false, act: true),
                ]
            }
            let posEmb = c.posEmbs[i] ? try loader.repCPE(n + ".pos_emb", d, kernel: 7) : nil
            let blocks: [MCiBlock] = try (0..<c.layers[i]).map { j in
                let bn = "\(n).blocks.\(j)"
                let mlp = try loader.convMlp(bn + ".mlp", d, hidden: c.mlpHidden(i))
                switch c.tokenMixers[i] {
                case .repmixer:
                    let scale = try loader.layerScale(bn + ".layer_scale", d)
                    return .repmixer(tokenMixer: try loader.repMixer(bn + ".token_mixer", d, kernel: c.repmixerKernelSize), mlp: mlp,
                                     layerScale: scale, scaledFC2: mlp.scaledFC2(scale))
                case .attention:
                    guard d % c.headDim == 0 else { throw CheckpointError.badConfig(file: "MCi config", reason: "width \(d) is not a multiple of head_dim \(c.headDim)") }
                    return .attention(norm: try loader.batchNorm(bn + ".norm", d),
                                      qkv: try loader.linear(bn + ".token_mixer.qkv", in: d, out: 3 * d, bias: false),
                                      proj: try loader.linear(bn + ".token_mixer.proj", in: d, out: d),
                                      layerScale1: try loader.layerScale(bn + ".layer_scale_1", d), mlp: mlp,
                                      layerScale2: try loader.layerScale(bn + ".layer_scale_2", d))
                }
            }
            stages.append(MCiStage(downsample: downsample, posEmb: posEmb, blocks: blocks))
            prev = d
        }
        self.stages = stages
        finalConv = try loader.mobileOne("final_conv", in: prev, out: c.finalFeatures, kernel: 3, stride: 1, depthwise: true, se: true, act: true)
        head = try loader.linear("head.fc", in: c.finalFeatures, out: c.embedDim)
        w = loader.reader
        if let weights {
            for name in weights.tensorNames.sorted() where name.hasPrefix(prefix) && !w.used.contains(name) {
                if !name.hasSuffix(".num_batches_tracked") { throw CheckpointError.unexpectedTensor(weights.displayName(name)) }
            }
        }
    }

    public var embedDim: Int { config.embedDim }

    /// Whether the tower takes (B,3,H,W) input of this size: image_size × image_size only (open_clip
    /// resizes and crops to it; the pooled features would be defined at other sizes, but not as trained).
    public func accepts(height h: Int, width w: Int) -> Bool { h == config.imageSize && w == config.imageSize }

    /// The input size `accepts`, in words: "256×256".
    public var inputSizeRule: String { "\(config.imageSize)×\(config.imageSize)" }

    /// Image features (B, embed_dim) of pixels (B,3,S,S), S = image_size, as open_clip's `encode_image`
    /// before normalisation. Sub-batches run side by side (`batchParallel`).
    public func imageFeatures(pixels: UnsafePointer<Float>, batch b: Int) -> [Float] {
        let s = config.imageSize, e = config.embedDim, image = 3 * s * s
        var out = [Float](repeating: 0, count: b * e)
        out.withUnsafeMutableBufferPointer { o in
            let o = o.baseAddress!
            withDenormalsFlushed {
                batchParallel(b) { r in
                    let x = trunkInput(pixels: pixels + r.lowerBound * image, batch: r.count, stages: stages.count, blocksOfLast: stages.last!.blocks.count)
                    let f = finalFeatures(x)
                    copyFloats(o + r.lowerBound * e, f.data, count: f.count)
                }
            }
        }
        return out
    }

    /// pixels (B,3,H,W) → the activations after the stem, `stages` − 1 whole stages and the first
    /// `blocksOfLast` blocks (with downsampling and pos_emb) of stage `stages` − 1.
    func trunkInput(pixels: UnsafePointer<Float>, batch b: Int, stages count: Int, blocksOfLast: Int) -> FeatureMap {
        let s = config.imageSize
        var x = FeatureMap(b: b, h: s, w: s, c: 3)
        // (B,3,H,W) → (B,H,W,3), a row of pixels at a time
        profiled(.copy) {
            let d = x.data
            parallelFor(b * s, grain: 16) { rows in
                for row in rows {
                    let bi = row / s, y = row % s
                    for ch in 0..<3 {
                        let src = pixels + ((bi * 3 + ch) * s + y) * s, dst = d + row * s * 3 + ch
                        for p in 0..<s { dst[p * 3] = src[p] }
                    }
                }
            }
        }
        for unit in stem { x = unit.forward(x) }
        for (i, stage) in stages.prefix(count).enumerated() {
            for unit in stage.downsample { x = unit.forward(x) }
            if let pos = stage.posEmb {
                let y = FeatureMap(b: x.b, h: x.h, w: x.w, c: x.c)
                pos.forward(y.data, x.data, b: x.b, h: x.h, w: x.w)
                x = y
            }
            for block in stage.blocks.prefix(i == count - 1 ? blocksOfLast : stage.blocks.count) { x = blockForward(block, x) }
        }
        return x
    }

    /// final_conv, global average pool, head.fc: (B, embed_dim).
    func finalFeatures(_ x: FeatureMap) -> Buffer {
        let y = finalConv.forward(x)
        let pooled = Buffer(count: y.b * y.c), f = Buffer(count: y.b * config.embedDim)
        meanRowsForward(pooled.data, y.data, b: y.b, n: y.h * y.w, c: y.c)
        head.forward(f.data, pooled.data, n: y.b)
        return f
    }

    /// block(x): a RepMixer block into a new map (its token mixer is a convolution), an attention block in place.
    func blockForward(_ block: MCiBlock, _ x: FeatureMap) -> FeatureMap {
        let n = x.rows, d = x.c
        switch block {
        case .repmixer(let mixer, let mlp, _, let fc2):
            let y = FeatureMap(b: x.b, h: x.h, w: x.w, c: d)
            mixer.forward(y.data, x.data, b: x.b, h: x.h, w: x.w)
            // y += layer_scale · fc2(gelu(fc1(conv(y)))), the layer scale folded into fc2
            let c0 = Buffer(uninitializedCount: n * d)
            mlp.conv.forward(c0.data, y.data, b: y.b, h: y.h, w: y.w)
            pointwiseMLPForward(y.data, adding: y.data, c0.data, fc1: mlp.fc1.weight.data, mlp.fc1.bias!.data, fc2: fc2.weight.data, fc2.bias?.data,
                                n: n, c: d, hidden: mlp.fc1.outFeatures, outFeatures: d, .gelu)
            withExtendedLifetime(c0) {}
            return y
        case .attention(let norm, let qkv, let proj, let scale1, let mlp, let scale2):
            let (nScale, nShift) = norm.affine(weight: norm.weight.data, bias: norm.bias.data)
            let t = attentionForward(x, norm: (nScale, nShift), qkv: qkv, proj: proj, tape: nil)
            scaledResidualForward(x.data, x.data, t.data, scale1.data, n: n, c: d)
            let m = mlpForward(mlp, x, tape: nil)
            scaledResidualForward(x.data, x.data, m.data, scale2.data, n: n, c: d)
            return x
        }
    }

    /// proj(attention(qkv(norm(x)))) of x (B,N,C), N = H·W tokens; with a tape, keeps qkv and the probabilities.
    func attentionForward(_ x: FeatureMap, norm: (Buffer, Buffer), qkv: Linear, proj: Linear, tape: AttentionTape?) -> Buffer {
        let n = x.rows, d = x.c, t = x.h * x.w, heads = d / config.headDim
        let normed = Buffer(uninitializedCount: n * d), q = tape?.qkv ?? Buffer(uninitializedCount: n * 3 * d)
        let probs = tape?.probs ?? Buffer(count: x.b * heads * t * t), att = Buffer(uninitializedCount: n * d), out = Buffer(uninitializedCount: n * d)
        channelAffineForward(normed.data, x.data, norm.0.data, norm.1.data, n: n, c: d)
        qkv.forward(q.data, normed.data, n: n)
        Kernels.attentionForward(att.data, probs: probs.data, q.data, b: x.b, t: t, d: d, heads: heads, causal: false)
        proj.forward(out.data, att.data, n: n)
        withExtendedLifetime((normed, q, probs, att)) {}
        return out
    }

    /// fc2(gelu(fc1(conv(x)))) of x (B,H,W,C); with a tape, keeps fc1's output (before GELU).
    func mlpForward(_ mlp: ConvMlp, _ x: FeatureMap, tape: MlpTape?) -> Buffer {
        let n = x.rows, d = x.c
        let c0 = Buffer(uninitializedCount: n * d), out = Buffer(uninitializedCount: n * d)
        mlp.conv.forward(c0.data, x.data, b: x.b, h: x.h, w: x.w)
        pointwiseMLPForward(out.data, adding: nil, c0.data, fc1: mlp.fc1.weight.data, mlp.fc1.bias!.data, fc2: mlp.fc2.weight.data, mlp.fc2.bias?.data,
                            n: n, c: d, hidden: mlp.fc1.outFeatures, outFeatures: d, .gelu, preActivation: tape?.hidden.data)
        withExtendedLifetime(c0) {}
        return out
    }
}

/// What an attention block's backward needs of its token mixer.
final class AttentionTape {
    let qkv: Buffer, probs: Buffer
    init(n: Int, d: Int, b: Int, heads: Int, t: Int) { qkv = Buffer(count: n * 3 * d); probs = Buffer(count: b * heads * t * t) }
}
/// What a ConvMlp's backward needs: fc1's output before the GELU.
final class MlpTape {
    let hidden: Buffer
    init(n: Int, hidden h: Int) { hidden = Buffer(count: n * h) }
}

/// Reads (and, for the training form, folds) the tensors of each MCi layer kind, by timm's names.
struct MCiLoader {
    var reader: WeightReader
    let training: Bool
    let eps: Float
    var random: Bool { reader.source == nil }
    /// Random weights (no checkpoint, benchmarks) as timm initialises a FastVit, so activations stay O(1):
    /// convolutions and linears U(±√(6/fan_in)) (He, so GELU stacks keep their scale), biases 0, BatchNorms
    /// identity, layer scales 1e-5 (timm's init).
    var generator = SplitMix64(seed: 0x6D6369)

    /// A tensor of the checkpoint, or a random one in timm's init (see `generator`).
    mutating func tensor(_ name: String, _ shape: [Int]) throws -> Buffer {
        guard random else { return try reader.tensor(name, shape) }
        let count = shape.reduce(1, *)
        if name.hasSuffix(".gamma") { return Buffer([Float](repeating: 1e-5, count: count)) }
        if shape.count == 1 {
            let isNormWeight = name.hasSuffix("bn.weight") || name.hasSuffix("norm.weight")
            return Buffer([Float](repeating: isNormWeight ? 1 : 0, count: count))
        }
        let bound = (6 / Float(shape.dropFirst().reduce(1, *))).squareRoot()
        return Buffer((0..<count).map { _ in Float.random(in: -bound...bound, using: &generator) })
    }

    mutating func linear(_ name: String, in i: Int, out o: Int, bias: Bool = true) throws -> Linear {
        Linear(weight: try tensor(name + ".weight", [o, i]), bias: bias ? try tensor(name + ".bias", [o]) : nil, inFeatures: i, outFeatures: o)
    }

    /// BatchNorm `name` (weight, bias, running_mean, running_var) as (scale, shift).
    mutating func bnAffine(_ name: String, _ c: Int) throws -> (scale: [Float], shift: [Float]) {
        let bn = try batchNorm(name, c)
        let (s, t) = bn.affine(weight: bn.weight.data, bias: bn.bias.data)
        return (s.array, t.array)
    }

    mutating func batchNorm(_ name: String, _ c: Int) throws -> BatchNorm {
        let weight = try tensor(name + ".weight", [c]), bias = try tensor(name + ".bias", [c])
        if random {  // random benchmark weights: identity statistics (a random variance could be negative)
            return BatchNorm(weight: weight, bias: bias, runningMean: Buffer(count: c),
                             runningVar: Buffer([Float](repeating: 1, count: c)), eps: eps)
        }
        return BatchNorm(weight: weight, bias: bias, runningMean: try tensor(name + ".running_mean", [c]),
                         runningVar: try tensor(name + ".running_var", [c]), eps: eps)
    }

    /// A ConvNormAct branch `name` (conv.weight without bias, bn): the conv with the BatchNorm folded in.
    mutating func convBN(_ name: String, out: Int, inPerGroup: Int, kernel k: Int) throws -> FoldedConv {
        var f = FoldedConv(outChannels: out, inPerGroup: inPerGroup, kernel: k)
        f.weight = try tensor(name + ".conv.weight", [out, inPerGroup, k, k]).array
        let (scale, shift) = try bnAffine(name + ".bn", out)
        let per = inPerGroup * k * k
        for o in 0..<out { for j in 0..<per { f.weight[o * per + j] *= scale[o] } }
        f.bias = shift
        return f
    }

    /// A BatchNorm on the identity branch as a conv of kernel k: 1 at the centre tap of input o % inPerGroup.
    mutating func identityBN(_ name: String, _ c: Int, inPerGroup: Int, kernel k: Int) throws -> FoldedConv {
        var f = FoldedConv(outChannels: c, inPerGroup: inPerGroup, kernel: k)
        let (scale, shift) = try bnAffine(name, c)
        for o in 0..<c { f.weight[((o * inPerGroup + o % inPerGroup) * k + k / 2) * k + k / 2] = scale[o] }
        f.bias = shift
        return f
    }

    /// `name.reparam_conv` (weight, bias) as read.
    mutating func reparam(_ name: String, out: Int, inPerGroup: Int, kernel k: Int) throws -> FoldedConv {
        var f = FoldedConv(outChannels: out, inPerGroup: inPerGroup, kernel: k)
        f.weight = try tensor(name + ".reparam_conv.weight", [out, inPerGroup, k, k]).array
        f.bias = try tensor(name + ".reparam_conv.bias", [out]).array
        return f
    }

    /// MobileOneBlock's folded conv: Σ conv_kxk.i + conv_scale (1×1, when k > 1 and the block has one) +
    /// identity (a BatchNorm, when in = out and stride 1), or reparam_conv.
    mutating func mobileOneConv(_ name: String, in cin: Int, out: Int, kernel k: Int, stride: Int, depthwise: Bool,
                                convBranches: Int = 1, scaleBranch: Bool = true) throws -> FoldedConv {
        let ipg = depthwise ? 1 : cin
        guard training else { return try reparam(name, out: out, inPerGroup: ipg, kernel: k) }
        var f = FoldedConv(outChannels: out, inPerGroup: ipg, kernel: k)
        for i in 0..<convBranches { f.add(try convBN("\(name).conv_kxk.\(i)", out: out, inPerGroup: ipg, kernel: k)) }
        if k > 1 && scaleBranch { f.add(try convBN(name + ".conv_scale", out: out, inPerGroup: ipg, kernel: 1)) }
        if cin == out && stride == 1 { f.add(try identityBN(name + ".identity", out, inPerGroup: ipg, kernel: k)) }
        return f
    }

    mutating func squeezeExcite(_ name: String, _ c: Int, reduced r: Int) throws -> SqueezeExcite {
        let fc1 = try tensor(name + ".fc1.weight", [r, c, 1, 1]), fc2 = try tensor(name + ".fc2.weight", [c, r, 1, 1])
        return SqueezeExcite(fc1: Linear(weight: fc1, bias: try tensor(name + ".fc1.bias", [r]), inFeatures: c, outFeatures: r),
                             fc2: Linear(weight: fc2, bias: try tensor(name + ".fc2.bias", [c]), inFeatures: r, outFeatures: c))
    }

    /// MobileOneBlock: folded conv, SE (timm: rd_ratio 1/16, rd_divisor 1), GELU.
    mutating func mobileOne(_ name: String, in cin: Int, out: Int, kernel k: Int, stride: Int, depthwise: Bool, se: Bool, act: Bool) throws -> ConvUnit {
        let f = try mobileOneConv(name, in: cin, out: out, kernel: k, stride: stride, depthwise: depthwise)
        return ConvUnit(conv: Conv2d(f, inChannels: cin, stride: stride),
                        se: se ? try squeezeExcite(name + ".se", out, reduced: makeDivisible(Double(out) / 16, 1, roundLimit: 0)) : nil,
                        gelu: act)
    }

    /// ReparamLargeKernelConv (depthwise): large_conv + small_conv (3×3) folded, SE (rd_ratio 0.25), GELU when lkc_use_act.
    mutating func largeKernel(_ name: String, in cin: Int, out: Int, kernel k: Int, stride: Int, se: Bool, act: Bool) throws -> ConvUnit {
        var f: FoldedConv
        if training {
            f = try convBN(name + ".large_conv", out: out, inPerGroup: 1, kernel: k)
            f.add(try convBN(name + ".small_conv", out: out, inPerGroup: 1, kernel: 3))
        } else {
            f = try reparam(name, out: out, inPerGroup: 1, kernel: k)
        }
        return ConvUnit(conv: Conv2d(f, inChannels: cin, stride: stride),
                        se: se ? try squeezeExcite(name + ".se", out, reduced: makeDivisible(Double(out) * 0.25, 8)) : nil, gelu: act)
    }

    /// RepMixer: reparam_conv = mixer.id + layer_scale·(mixer − norm), bias layer_scale·(b_mixer − b_norm)
    /// (timm RepMixer.reparameterize), `mixer` a depthwise MobileOneBlock with all branches, `norm` its identity BN only.
    mutating func repMixer(_ name: String, _ d: Int, kernel k: Int) throws -> Conv2d {
        guard training else { return Conv2d(try reparam(name, out: d, inPerGroup: 1, kernel: k), inChannels: d, stride: 1) }
        let mixer = try mobileOneConv(name + ".mixer", in: d, out: d, kernel: k, stride: 1, depthwise: true)
        let norm = try mobileOneConv(name + ".norm", in: d, out: d, kernel: k, stride: 1, depthwise: true, convBranches: 0, scaleBranch: false)
        let gamma = try layerScale(name + ".layer_scale", d)
        var f = FoldedConv(outChannels: d, inPerGroup: 1, kernel: k)
        let kk = k * k
        for o in 0..<d {
            let g = gamma.data[o]
            for j in 0..<kk { f.weight[o * kk + j] = g * (mixer.weight[o * kk + j] - norm.weight[o * kk + j]) }
            f.weight[o * kk + kk / 2] += 1
            f.bias[o] = g * (mixer.bias[o] - norm.bias[o])
        }
        return Conv2d(f, inChannels: d, stride: 1)
    }

    /// RepConditionalPosEnc: x + pos_enc(x) (depthwise with bias) = one conv with 1 added at the centre tap.
    mutating func repCPE(_ name: String, _ d: Int, kernel k: Int) throws -> Conv2d {
        guard training else { return Conv2d(try reparam(name, out: d, inPerGroup: 1, kernel: k), inChannels: d, stride: 1) }
        var f = FoldedConv(outChannels: d, inPerGroup: 1, kernel: k)
        f.weight = try tensor(name + ".pos_enc.weight", [d, 1, k, k]).array
        f.bias = try tensor(name + ".pos_enc.bias", [d]).array
        for o in 0..<d { f.weight[o * k * k + k * k / 2] += 1 }
        return Conv2d(f, inChannels: d, stride: 1)
    }

    /// ConvMlp (both forms alike: timm keeps its conv + bn): the 7×7 depthwise conv with its BN folded, fc1, fc2.
    mutating func convMlp(_ name: String, _ d: Int, hidden: Int) throws -> ConvMlp {
        let conv = Conv2d(try convBN(name + ".conv", out: d, inPerGroup: 1, kernel: 7), inChannels: d, stride: 1)
        let fc1 = try tensor(name + ".fc1.weight", [hidden, d, 1, 1]), fc2 = try tensor(name + ".fc2.weight", [d, hidden, 1, 1])
        return ConvMlp(conv: conv,
                       fc1: Linear(weight: fc1, bias: try tensor(name + ".fc1.bias", [hidden]), inFeatures: d, outFeatures: hidden),
                       fc2: Linear(weight: fc2, bias: try tensor(name + ".fc2.bias", [d]), inFeatures: hidden, outFeatures: d))
    }

    /// LayerScale2d `name.gamma` (C,1,1) as (C).
    mutating func layerScale(_ name: String, _ d: Int) throws -> Buffer {
        try tensor(name + ".gamma", [d, 1, 1])
    }
}

/// timm's make_divisible: v rounded to a multiple of `divisor` (at least `divisor`), not below roundLimit·v.
func makeDivisible(_ v: Double, _ divisor: Int, roundLimit: Double = 0.9) -> Int {
    var n = max(divisor, Int(v + Double(divisor) / 2) / divisor * divisor)
    if Double(n) < roundLimit * v { n += divisor }
    return n
}
