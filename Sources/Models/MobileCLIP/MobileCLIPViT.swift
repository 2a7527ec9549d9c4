import Foundation
import Kernels

/// MobileCLIP-B's image tower, timm's `vit_base_mci_224` (open_clip `visual.trunk.*`): a ViT-B/16 whose patch
/// embedding is a convolutional stem (`patch_embed.backbone`, timm's ConvStem):
///   0: Conv2d(3→192, k 4, stride 4, no bias) · BatchNorm · GELU
///   1: Conv2d(192→192, k 2, stride 2, no bias) · BatchNorm · GELU
///   2: Conv2d(192→768, k 2, stride 2, bias)
/// then position embeddings on the 14×14 patch tokens only (`no_embed_class`), the CLS token in front, 12
/// pre-norm blocks (`blocks.i`: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2, exact GELU, LayerNorm eps
/// 1e-6), the final `norm`, the CLS token, and the trunk's `head` Linear(768 → embed_dim) as open_clip's
/// projection (timm_proj null). Every stem convolution is non-overlapping (kernel = stride, no padding), so it
/// is a patch gather and a GEMM; BatchNorm (eval: running statistics) is folded into the convolution at load.
///
/// The sizes are read off the tensors (channels, kernels, depth, width, MLP width; heads = width / 64 as in
/// timm's ViT-B), so a small model of the same blocks loads under the same name (the parity fixtures).
public struct MobileCLIPViT: @unchecked Sendable {
    /// One stem convolution with its BatchNorm folded in: weight (OUT, k·k·IN) ordered as the patch gather's
    /// rows — (c, ky, kx) for the first, which reads the (B,3,H,W) pixels; (ky, kx, c) for the others, which
    /// read channels-last activations.
    struct StemConv {
        let linear: Linear
        let kernel: Int
        let activates: Bool
    }

    public let imageSize: Int
    public let hiddenSize: Int
    public let numHeads: Int
    public let gridSize: Int
    let stem: [StemConv]                // patch_embed.backbone.{0,1,2}
    let clsToken: Buffer                // cls_token (1,1,D)
    let posEmbed: Buffer                // pos_embed (1,np,D), patch tokens only
    let blocks: [EncoderLayer]          // blocks.i
    let norm: LayerNorm                 // norm
    let head: Linear                    // head (P,D) + bias
    /// Checkpoint tensors that play no part in inference (BatchNorm's `num_batches_tracked`), without the prefix.
    let ignoredTensors: Set<String>
    static let layerNormEps: Float = 1e-6, batchNormEps: Float = 1e-5, headWidth = 64
    public var projectionDim: Int { head.outFeatures }
    public var intermediateSize: Int { blocks[0].intermediate }
    public var numPatches: Int { gridSize * gridSize }
    public var depth: Int { blocks.count }
    /// Floats of the stem's activations for one image (its patch gathers and outputs).
    public var stemFloatsPerImage: Int {
        var side = imageSize, total = 0
        for conv in stem {
            side /= conv.kernel
            total += side * side * (conv.linear.inFeatures + conv.linear.outFeatures)
        }
        return total
    }

    init(imageSize: Int, projectionDim: Int, _ w: inout WeightReader, prefix p: String) throws {
        self.imageSize = imageSize
        // sizes: from the tensors, or vit_base_mci_224's for random weights
        func shape(_ name: String) -> [Int]? { w.source?.shape(of: w.prefix + p + name) }
        func display(_ name: String) -> String { w.source?.displayName(w.prefix + p + name) ?? p + name }
        var convShapes: [[Int]] = []
        for i in 0..<3 {
            let name = "patch_embed.backbone.\(i).conv.weight"
            if w.source == nil {
                convShapes.append([[192, 3, 4, 4], [192, 192, 2, 2], [768, 192, 2, 2]][i])
            } else {
                guard let s = shape(name) else { throw CheckpointError.missingTensor(display(name)) }
                guard s.count == 4, s[2] == s[3], s[2] > 0, s[1] == (i == 0 ? 3 : convShapes[i - 1][0]) else {
                    throw CheckpointError.shapeMismatch(name: display(name), expected: [i == 0 ? 192 : convShapes[i - 1][0], i == 0 ? 3 : convShapes[i - 1][0], -1, -1], found: s)
                }
                convShapes.append(s)
            }
        }
        let d = convShapes[2][0]
        let file = OpenCLIPFolder.configFile
        guard d % Self.headWidth == 0 else {
            throw CheckpointError.badConfig(file: file, reason: "the ViT width \(d) (from \(display("patch_embed.backbone.2.conv.weight"))) is not a multiple of timm's head width 64")
        }
        hiddenSize = d
        numHeads = d / Self.headWidth
        let stride = convShapes.map { $0[2] }.reduce(1, *)
        guard imageSize % stride == 0 else {
            throw CheckpointError.badConfig(file: file, reason: "vision_cfg.image_size \(imageSize) is not a multiple of the stem's stride \(stride)")
        }
        gridSize = imageSize / stride
        var depth = 0
        if w.source == nil { depth = 12 } else { while shape("blocks.\(depth).norm1.weight") != nil { depth += 1 } }
        guard depth > 0 else { throw CheckpointError.missingTensor(display("blocks.0.norm1.weight")) }
        let inter = w.source == nil ? 4 * d : (shape("blocks.0.mlp.fc1.weight")?.first ?? 4 * d)

        var stem: [StemConv] = []
        var ignored: Set<String> = []
        for (i, s) in convShapes.enumerated() {
            let n = "\(p)patch_embed.backbone.\(i)"
            let (out, inC, k) = (s[0], s[1], s[2])
            let raw = try w.tensor(n + ".conv.weight", s)
            let last = i == convShapes.count - 1
            var weight = [Float](repeating: 0, count: out * inC * k * k)
            var bias = last ? try w.tensor(n + ".conv.bias", [out]).array : [Float](repeating: 0, count: out)
            // (out, c, ky, kx) → (out, ky, kx, c) for the channels-last gathers
            for o in 0..<out {
                for c in 0..<inC {
                    for ky in 0..<k {
                        for kx in 0..<k {
                            let src = ((o * inC + c) * k + ky) * k + kx
                            let dst = i == 0 ? src : ((o * k + ky) * k + kx) * inC + c
                            weight[dst] = raw.data[src]
                        }
                    }
                }
            }
            if !last {
                // y = (conv(x) − running_mean) / √(running_var + eps) · weight + bias
                let gamma = try w.tensor(n + ".bn.weight", [out]), beta = try w.tensor(n + ".bn.bias", [out])
                let mean = try w.tensor(n + ".bn.running_mean", [out]), variance = try w.tensor(n + ".bn.running_var", [out])
                ignored.insert("\(n).bn.num_batches_tracked")
                for o in 0..<out {
                    // random weights: unit variance (a random running_var could be negative)
                    let v = w.source == nil ? 1 : variance.data[o]
                    let scale = gamma.data[o] / (v + Self.batchNormEps).squareRoot()
                    for j in 0..<(inC * k * k) { weight[o * inC * k * k + j] *= scale }
                    bias[o] = (bias[o] - (w.source == nil ? 0 : mean.data[o])) * scale + beta.data[o]
                }
            }
            stem.append(StemConv(linear: Linear(weight: Buffer(weight), bias: Buffer(bias), inFeatures: inC * k * k, outFeatures: out),
                                 kernel: k, activates: !last))
        }
        self.stem = stem
        ignoredTensors = ignored
        clsToken = try w.tensor(p + "cls_token", [1, 1, d])
        posEmbed = try w.tensor(p + "pos_embed", [1, gridSize * gridSize, d])
        let e = Self.layerNormEps
        blocks = try (0..<depth).map { i in
            let n = "\(p)blocks.\(i)"
            return EncoderLayer(norm1: try w.layerNorm(n + ".norm1", d, eps: e), qkv: try w.linear(n + ".attn.qkv", in: d, out: 3 * d),
                                out: try w.linear(n + ".attn.proj", in: d, out: d), scale1: nil,
                                norm2: try w.layerNorm(n + ".norm2", d, eps: e),
                                fc1: try w.linear(n + ".mlp.fc1", in: d, out: inter),
                                fc2: try w.linear(n + ".mlp.fc2", in: inter, out: d), scale2: nil)
        }
        norm = try w.layerNorm(p + "norm", d, eps: e)
        head = try w.linear(p + "head", in: d, out: projectionDim)
    }

    /// The patch tokens (B, np, D) of pixels (B,3,S,S): the stem, channels-last after its first convolution.
    func stemForward(pixels: UnsafePointer<Float>, batch b: Int) -> Buffer {
        var side = imageSize
        var x: Buffer? = nil
        for (i, conv) in stem.enumerated() {
            let k = conv.kernel, g = side / k, rows = b * g * g
            let cols = Buffer(count: rows * conv.linear.inFeatures)
            if i == 0 {
                im2colPatches(cols.data, pixels, b: b, c: 3, h: side, w: side, patch: k)
            } else {
                channelsLastPatches(cols.data, x!.data, b: b, side: side, c: stem[i - 1].linear.outFeatures, patch: k)
            }
            let y = Buffer(count: rows * conv.linear.outFeatures)
            conv.linear.forward(y.data, cols.data, n: rows)
            if conv.activates { activationForward(y.data, y.data, count: y.count, .gelu) }
            withExtendedLifetime((cols, x)) {}
            x = y
            side = g
        }
        return x!
    }

    /// Hidden states (B, 1+P+np, D) after `layerCount` blocks: [CLS; prompts; patches + pos_embed], P prompt
    /// tokens (P,D) inserted after CLS (there is no pre-norm). `norms` replaces the blocks' LayerNorms.
    func hiddenStates(pixels: UnsafePointer<Float>, batch b: Int, prompts: UnsafePointer<Float>?, promptCount p: Int,
                      norms: MobileCLIPViTNorms, layerCount: Int, tape: [LayerActivations]?) -> Buffer {
        let d = hiddenSize, np = numPatches, t = 1 + p + np
        let patches = stemForward(pixels: pixels, batch: b)
        let x = Buffer(count: b * t * d)
        for bi in 0..<b {
            let row = x.data + bi * t * d
            copyFloats(row, clsToken.data, count: d)
            if let prompts { copyFloats(row + d, prompts, count: p * d) }
            residualForward(row + (1 + p) * d, patches.data + bi * np * d, posEmbed.data, count: np * d)
        }
        let shared = tape == nil ? LayerActivations(b: b, t: t, d: d, heads: numHeads, intermediate: intermediateSize, keepsInputs: false) : nil
        for (i, layer) in blocks.prefix(layerCount).enumerated() {
            encoderLayerForward(layer, x.data, tape?[i] ?? shared!, heads: numHeads, activation: .gelu, causal: false,
                                norm1: norms.blocks[i].norm1, norm2: norms.blocks[i].norm2)
        }
        withExtendedLifetime((patches, shared)) {}
        return x
    }

    /// open_clip's `encode_image`: head(norm(blocks(x))[:, 0]), (B, embed_dim), the batch split across threads.
    func imageFeatures(pixels: UnsafePointer<Float>, batch b: Int, prompts: UnsafePointer<Float>? = nil, promptCount p: Int = 0,
                       norms: MobileCLIPViTNorms? = nil) -> [Float] {
        let norms = norms ?? MobileCLIPViTNorms(self), image = 3 * imageSize * imageSize, e = projectionDim
        var out = [Float](repeating: 0, count: b * e)
        out.withUnsafeMutableBufferPointer { o in
            let o = o.baseAddress!
            batchParallel(b) { r in
                let part = imageFeaturesOfSubBatch(pixels: pixels + r.lowerBound * image, batch: r.count, prompts: prompts, promptCount: p, norms: norms)
                copyFloats(o + r.lowerBound * e, part, count: part.count)
            }
        }
        return out
    }

    func imageFeaturesOfSubBatch(pixels: UnsafePointer<Float>, batch b: Int, prompts: UnsafePointer<Float>?, promptCount p: Int,
                                 norms: MobileCLIPViTNorms) -> [Float] {
        let d = hiddenSize, last = blocks.count - 1
        let x = hiddenStates(pixels: pixels, batch: b, prompts: prompts, promptCount: p, norms: norms, layerCount: last, tape: nil)
        let acts = LayerActivations(b: b, t: x.count / (b * d), d: d, heads: numHeads, intermediate: intermediateSize, keepsInputs: false)
        let cls = encoderLayerForwardRow(blocks[last], x.data, row: 0, acts, heads: numHeads, activation: .gelu, causal: false,
                                         norm1: norms.blocks[last].norm1, norm2: norms.blocks[last].norm2)
        let pooled = Buffer(count: b * d)
        norms.norm.forward(pooled.data, mean: nil, rstd: nil, cls.data, n: b)
        var out = [Float](repeating: 0, count: b * projectionDim)
        head.forward(&out, pooled.data, n: b)
        withExtendedLifetime((x, acts, cls, pooled)) {}
        return out
    }
}

/// cols (B·g·g, k·k·C) from channels-last x (B, side, side, C), g = side / k, each row ordered (ky, kx, c):
/// the patch gather of a non-overlapping k×k convolution on channels-last activations.
func channelsLastPatches(_ cols: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, b: Int, side: Int, c: Int, patch k: Int) {
    profiled(.patches, .forward) {
        let g = side / k
        parallelFor(b * g, grain: 1) { rows in
            for row in rows {
                let bi = row / g, gy = row % g
                for gx in 0..<g {
                    var dst = cols + ((bi * g + gy) * g + gx) * k * k * c
                    for ky in 0..<k {
                        // the k pixels of one kernel row are contiguous: k·C floats
                        let src = x + ((bi * side + gy * k + ky) * side + gx * k) * c
                        dst.update(from: src, count: k * c)
                        dst += k * c
                    }
                }
            }
        }
    }
}

/// The LayerNorms of MobileCLIP-B's ViT, frozen (the model's) or trainable copies (prompt tuning).
public struct MobileCLIPViTNorms: @unchecked Sendable {
    let blocks: [(norm1: LayerNorm, norm2: LayerNorm)]
    let norm: LayerNorm

    init(_ v: MobileCLIPViT) {
        blocks = v.blocks.map { ($0.norm1, $0.norm2) }
        norm = v.norm
    }

    init(blocks: [(norm1: LayerNorm, norm2: LayerNorm)], norm: LayerNorm) { self.blocks = blocks; self.norm = norm }

    func copy() -> MobileCLIPViTNorms {
        MobileCLIPViTNorms(blocks: blocks.map { ($0.norm1.copy(), $0.norm2.copy()) }, norm: norm.copy())
    }

    /// (checkpoint name, LayerNorm) for every norm, in checkpoint order.
    var named: [(String, LayerNorm)] {
        blocks.enumerated().flatMap { i, l in [("visual.trunk.blocks.\(i).norm1", l.norm1), ("visual.trunk.blocks.\(i).norm2", l.norm2)] }
            + [("visual.trunk.norm", norm)]
    }
}
