import XCTest
import Kernels
@testable import Models

/// `nolad bench` counts FLOPs from the GEMMs a pass runs; here they are checked against hand-computed
/// values for tiny models (2·m·n·k per product).
final class FLOPCountTests: XCTestCase {
    func testViTForward_FLOPs_matchHandCount() throws {
        var c = ViTConfig()
        c.hiddenSize = 8; c.numHiddenLayers = 2; c.numAttentionHeads = 2; c.intermediateSize = 16; c.imageSize = 8; c.patchSize = 4
        let vit = try ViTModel(kind: .vit, config: c, weights: nil)
        let pixels = [Float](repeating: 0.5, count: 2 * 3 * 8 * 8)
        let profile = KernelProfile()
        _ = profile.collect { pixels.withUnsafeBufferPointer { vit.clsFeatures(pixels: $0.baseAddress!, batch: 2, height: 8, width: 8) } }
        // B 2, D 8, I 16, 2 heads of 4, 4 patches + CLS = 5 tokens, N = 10 rows.
        // patch embedding 8×8×48: 6144. Layer 0: qkv 10×24×8 3840, out 10×8×8 1280, fc1 10×16×8 2560,
        // fc2 10×8×16 2560, attention 4 × (5×5×4 + 5×4×5) · 2 = 1600. Last layer, CLS row only: qkv 3840,
        // out 2×8×8 256, fc1 512, fc2 512, attention 4 × (1×5×4 + 1×4×5) · 2 = 320.
        let gemm: Int = 6144 + 3840 + 1280 + 2560 + 2560 + 3840 + 256 + 512 + 512
        XCTAssertEqual(profile.entry(.gemm, .forward).flops, gemm)
        XCTAssertEqual(profile.entry(.attention, .forward).flops, 1600 + 320)
        XCTAssertEqual(profile.totalFlops, 23424)
        XCTAssertEqual(profile.entry(.gemm, .backward).flops, 0)
    }

    func testCLIPPromptTuningStep_FLOPs_matchHandCount_forwardAndBackwardApart() throws {
        var config = CLIPConfig()
        config.visionConfig.hiddenSize = 8; config.visionConfig.intermediateSize = 16; config.visionConfig.numHiddenLayers = 2
        config.visionConfig.numAttentionHeads = 2; config.visionConfig.imageSize = 8; config.visionConfig.patchSize = 4
        config.textConfig.vocabSize = 50; config.textConfig.hiddenSize = 8; config.textConfig.intermediateSize = 16
        config.textConfig.numHiddenLayers = 1; config.textConfig.numAttentionHeads = 2; config.textConfig.maxPositionEmbeddings = 8
        config.projectionDim = 4
        let clip = try CLIPModel(config: config, weights: nil)
        let state = CLIPPromptTuning(model: clip, prompts: [Float](repeating: 0.1, count: 8), promptCount: 1,
                                     head: (0..<12).map { (i: Int) -> Float in Float(i) / 12 }, classCount: 3)
        let pixels: [Float] = (0..<384).map { (i: Int) -> Float in Float(i % 13) / 13 }
        let profile = KernelProfile()
        _ = profile.collect {
            clip.promptTuningStep(state, pixels: pixels, batch: 2) { logits, dlogits in
                crossEntropyForwardBackward(dlogits: dlogits, logits, labels: [0, 2], n: 2, c: 3)
            }
        }
        // B 2, D 8, I 16, 2 heads of 4, CLS + 1 prompt + 4 patches = 6 tokens, N = 12 rows, projection 4, 3 classes.
        // Forward: patches 8×8×48 6144; layer 0: qkv 12×24×8 4608, attention 4 × (6·6·4 + 6·4·6) · 2 = 2304,
        // out 1536, fc1 3072, fc2 3072; last layer (CLS row): qkv 4608, attention 4 × (6·4 + 4·6) · 2 = 384,
        // out 2×8×8 256, fc1 512, fc2 512; visual projection 2×4×8 128; head 2×3×4 48.
        let forwardGEMM: Int = 6144 + 4608 + 1536 + 3072 + 3072 + 4608 + 256 + 512 + 512 + 128 + 48
        XCTAssertEqual(profile.entry(.gemm, .forward).flops, forwardGEMM)
        XCTAssertEqual(profile.entry(.attention, .forward).flops, 2304 + 384)
        // Backward (input gradients; the head's weight gradient too): head dinp 48 + dweight 48, visual projection
        // 128; last layer: fc2 512, fc1 512, out 256, qkv 12×8×24 4608, attention 4 × 4 products of 6·4 · 2 = 768;
        // layer 0: fc2 3072, fc1 3072, out 1536, qkv 4608, attention 4 × 4 × 6·6·4 · 2 = 4608.
        let backwardGEMM: Int = 96 + 128 + 512 + 512 + 256 + 4608 + 3072 + 3072 + 1536 + 4608
        XCTAssertEqual(profile.entry(.gemm, .backward).flops, backwardGEMM)
        XCTAssertEqual(profile.entry(.attention, .backward).flops, 768 + 4608)
        XCTAssertEqual(profile.totalFlops, 27184 + 23776)
        XCTAssertGreaterThan(profile.entry(.layerNorm, .backward).calls, 0)
        XCTAssertGreaterThan(profile.entry(.copy, .backward).calls, 0)
    }
}
