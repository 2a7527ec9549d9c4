// Parity of the MCi image tower (MobileCLIP S0/S1/S2, timm fastvit_mci*) with timm/open_clip on the tiny
// random-weight FastVit of reference/make_mobileclip_fixtures.py, in both checkpoint forms. Tolerances as
// the CLIP parity tests: forward ≤ 1e-4 × the output's max magnitude, gradients ≤ 1e-3.
import Foundation
import Kernels
import XCTest
@testable import Models

/// The fixture's architecture (see the script): every block kind of fastvit_mci0/1/2 at tiny widths.
let tinyMCi: MCiConfig = {
    var c = MCiConfig(layers: [1, 1, 1, 2], embedDims: [8, 16, 32, 64], mlpRatios: [3, 3, 3, 2],
                      seDownsamples: [false, false, true, true], tokenMixers: [.repmixer, .repmixer, .repmixer, .attention],
                      posEmbs: [false, false, false, true], embedDim: 12, imageSize: 96)
    c.lkcUseAct = true
    return c
}()

final class MCiParityTests: XCTestCase {
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    func testMCi_trainingFormFoldedAtLoad_matchesTimm() throws {
        let model = try MCiModel(config: tinyMCi, weights: try io("mci-train.safetensors"))
        XCTAssertTrue(model.loadedTrainingForm)
        let f = try io("mci_io.safetensors")
        let features = model.imageFeatures(pixels: try f.floats("pixel_values"), batch: 2)
        compare("MCi features, training form", features, try f.floats("train.features"), relTol: 1e-4)
        // nolad's fold against timm's reparameterize_model of the same weights
        compare("MCi features, training form vs timm's reparameterised model", features,
                try f.floats("train.reparameterized_features"), relTol: 1e-4)
    }

    func testMCi_reparameterisedForm_matchesTimm() throws {
        let model = try MCiModel(config: tinyMCi, weights: try io("mci-reparam.safetensors"))
        XCTAssertFalse(model.loadedTrainingForm)
        XCTAssertTrue(model.accepts(height: 96, width: 96))
        XCTAssertFalse(model.accepts(height: 96, width: 128))
        XCTAssertEqual(model.inputSizeRule, "96×96")
        let f = try io("mci_io.safetensors")
        compare("MCi features, reparameterised form", model.imageFeatures(pixels: try f.floats("pixel_values"), batch: 2),
                try f.floats("reparam.features"), relTol: 1e-4)
    }

    /// One image alone gives what it gives within the batch (sub-batches do not mix images).
    func testMCi_oneImageAlone_matchesItsRowInTheBatch() throws {
        let model = try MCiModel(config: tinyMCi, weights: try io("mci-reparam.safetensors"))
        let f = try io("mci_io.safetensors")
        let pixels = try f.floats("pixel_values")
        let second = Array(pixels[(3 * 96 * 96)...])
        compare("MCi features, second image alone", model.imageFeatures(pixels: second, batch: 1),
                Array(try f.floats("reparam.features")[12...]), relTol: 1e-4)
    }

    func testMCiLoading_missingExtraOrMisshapenTensor_throwsNamingIt() throws {
        let base = try io("mci-train.safetensors")
        struct Edited: TensorSource {
            let base: TensorSource
            var drop: String? = nil, add: String? = nil, reshape: (String, [Int])? = nil
            var tensorNames: [String] { base.tensorNames.filter { $0 != drop } + (add.map { [$0] } ?? []) }
            func shape(of name: String) -> [Int]? {
                if name == drop { return nil }
                if name == add { return [1] }
                if let (n, s) = reshape, n == name { return s }
                return base.shape(of: name)
            }
            func floats(_ name: String) throws -> [Float] { name == add ? [0] : try base.floats(name) }
        }
        let missing = "visual.trunk.stages.1.downsample.proj.0.small_conv.bn.running_var"
        XCTAssertThrowsError(try MCiModel(config: tinyMCi, weights: Edited(base: base, drop: missing))) {
            XCTAssertEqual($0 as? CheckpointError, .missingTensor(missing)); print($0)
        }
        let extra = "visual.trunk.stages.3.blocks.0.token_mixer.qkv.bias"
        XCTAssertThrowsError(try MCiModel(config: tinyMCi, weights: Edited(base: base, add: extra))) {
            XCTAssertEqual($0 as? CheckpointError, .unexpectedTensor(extra)); print($0)
        }
        let wrong = "visual.trunk.stages.3.blocks.1.mlp.fc1.weight"
        XCTAssertThrowsError(try MCiModel(config: tinyMCi, weights: Edited(base: base, reshape: (wrong, [128, 64, 3, 3])))) {
            XCTAssertEqual($0 as? CheckpointError, .shapeMismatch(name: wrong, expected: [128, 64, 1, 1], found: [128, 64, 3, 3])); print($0)
        }
        // the wrong tower for the checkpoint (S2's widths on the tiny weights) names the first tensor that differs
        XCTAssertThrowsError(try MCiModel(config: MCiConfig(timmModelName: "fastvit_mci2")!, weights: base)) {
            XCTAssertEqual($0 as? CheckpointError, .shapeMismatch(name: "visual.trunk.stem.0.conv_kxk.0.conv.weight", expected: [80, 3, 3, 3], found: [8, 3, 3, 3]))
            print($0)
        }
        // tensors outside the trunk's prefix (the text tower, logit_scale) are not the tower's business
        XCTAssertNoThrow(try MCiModel(config: tinyMCi, weights: Edited(base: base, add: "text.token_embedding.weight")))
    }

    /// The tuned variant (norm affine and layer scales of the attention stage, a linear head on the features,
    /// label-smoothing cross-entropy) against torch autograd, in both forms; two micro-batches of one image
    /// accumulate to the gradient of the mean over both.
    func testMCiTuning_gradientsOfNormsLayerScalesAndHead_matchTorchAutograd() throws {
        let f = try io("mci_io.safetensors")
        let pixels = try f.floats("pixel_values"), head = try f.floats("tune.head")
        let labels = try f.floats("tune.labels").map { Int($0) }
        for form in ["train", "reparam"] {
            let file = "mci-\(form).safetensors"
            let model = try MCiModel(config: tinyMCi, weights: try io(file))
            let names = model.tunedTensorNames
            XCTAssertEqual(names.count, 8)
            XCTAssertEqual(names.first, "stages.3.blocks.0.norm.weight")
            let tuned = model.initialTunedTensors()
            var grads = tuned.map { [Float](repeating: 0, count: $0.count) }
            var headGrad = [Float](repeating: 0, count: head.count), logitsSeen: [Float] = [], total: Float = 0
            let image = 3 * 96 * 96
            for bi in 0..<2 {
                let one = Array(pixels[(bi * image)..<((bi + 1) * image)])
                one.withUnsafeBufferPointer { px in
                    model.tuningStep(pixels: px.baseAddress!, batch: 1, tuned: tuned, lossGradient: { features in
                        var logits = [Float](repeating: 0, count: 5), dLogits = logits
                        linearForward(&logits, features, head, nil, n: 1, inFeatures: 12, outFeatures: 5)
                        logitsSeen += logits
                        total += crossEntropyForwardBackward(dlogits: &dLogits, logits, labels: [labels[bi]], n: 1, c: 5, smoothing: 0.1) / 2
                        for j in 0..<5 { dLogits[j] /= 2 }
                        var dFeatures = [Float](repeating: 0, count: 12)
                        linearBackward(dinp: &dFeatures, dweight: &headGrad, dbias: nil, dLogits, features, head, n: 1, inFeatures: 12, outFeatures: 5)
                        return dFeatures
                    }, gradients: &grads)
                }
            }
            compare("\(file) tuned logits", logitsSeen, try f.floats(form + ".tune.logits"), relTol: 1e-4)
            XCTAssertEqual(total, try f.floats(form + ".tune.loss")[0], accuracy: 1e-4)
            compare("\(file) grad head.weight", headGrad, try f.floats(form + ".tune.grad.head.weight"), relTol: 1e-3)
            for (name, g) in zip(names, grads) {
                compare("\(file) grad \(name)", g, try f.floats(form + ".tune.grad.visual.trunk." + name), relTol: 1e-3)
            }
            // the tuned forward with the pretrained tensors is the plain forward
            let plain = model.imageFeatures(pixels: pixels, batch: 2)
            let viaTuned = pixels.withUnsafeBufferPointer { model.tunedFeatures(pixels: $0.baseAddress!, batch: 2, tuned: tuned) }
            compare("\(file) tuned forward = forward", viaTuned, plain, relTol: 1e-6)
            // and a changed tensor changes it
            var moved = tuned
            moved[2] = moved[2].map { $0 * 1.5 }
            let changed = pixels.withUnsafeBufferPointer { model.tunedFeatures(pixels: $0.baseAddress!, batch: 2, tuned: moved) }
            XCTAssertGreaterThan(zip(changed, plain).map { abs($0 - $1) }.max()!, 1e-3)
        }
    }

    /// Random weights (benchmarks, no checkpoint) in timm's init keep the full-size towers' features finite
    /// and O(1): neither overflowing nor sinking into denormals, which would make a benchmark measure them.
    func testMCi_randomFullSizeWeights_giveFiniteFeaturesOfOrderOne() throws {
        let model = try MCiModel(config: MCiConfig(timmModelName: "fastvit_mci0")!, weights: nil)
        var rng = Models.SplitMix64(seed: 3)
        let pixels = (0..<(3 * 256 * 256)).map { _ in Float.random(in: -2...2, using: &rng) }
        let f = model.imageFeatures(pixels: pixels, batch: 1)
        let top = f.map(abs).max()!
        print("random fastvit_mci0 features: max magnitude \(top)")
        XCTAssertEqual(f.count, 512)
        XCTAssertTrue(f.allSatisfy { $0.isFinite })
        XCTAssertGreaterThan(top, 1e-2)
        XCTAssertLessThan(top, 1e4)
    }

    func testMCiConfig_timmNames() {
        XCTAssertEqual(MCiConfig(timmModelName: "fastvit_mci0")?.layers, [2, 6, 10, 2])
        XCTAssertEqual(MCiConfig(timmModelName: "fastvit_mci1")?.layers, [4, 12, 20, 4])
        XCTAssertEqual(MCiConfig(timmModelName: "fastvit_mci2")?.embedDims, [80, 160, 320, 640])
        XCTAssertNil(MCiConfig(timmModelName: "fastvit_mci3"))
        XCTAssertEqual(MCiConfig(timmModelName: "fastvit_mci0")?.imageSize, 256)
        XCTAssertEqual(makeDivisible(1024.0 / 16, 1, roundLimit: 0), 64)
        XCTAssertEqual(makeDivisible(256 * 0.25, 8), 64)
        XCTAssertEqual(makeDivisible(32 * 0.25, 8), 8)
    }
}
