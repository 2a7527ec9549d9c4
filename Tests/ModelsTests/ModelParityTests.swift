// Parity of the Swift models with transformers on the tiny random-weight fixtures written by
// reference/make_model_fixtures.py. Forward: max abs error ≤ 1e-4 × the output's max magnitude;
// gradients: ≤ 1e-3 × the gradient's max magnitude. Every comparison prints its error.
import Foundation
import Kernels
import XCTest
@testable import Models

let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")

func io(_ name: String) throws -> SafeTensorsFile { try SafeTensorsFile(url: fixtures.appendingPathComponent(name)) }

func compare(_ name: String, _ got: [Float], _ want: [Float], relTol: Float, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(got.count, want.count, "\(name): size", file: file, line: line)
    guard got.count == want.count else { return }
    let err = zip(got, want).map { abs($0 - $1) }.max() ?? 0
    let scale = max(want.map(abs).max() ?? 0, 1e-12)
    print("\(name): max abs error \(err), scale \(scale), relative \(err / scale) (tolerance \(relTol))")
    XCTAssertLessThanOrEqual(err / scale, relTol, name, file: file, line: line)
}

final class CLIPParityTests: XCTestCase {
    /// Each test runs with two kernel threads, bound to the test's thread.
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    func testCLIPVision_hiddenStatesPooledAndImageFeatures_matchTransformers() throws {
        let model = try CLIPModel(folder: fixtures.appendingPathComponent("clip"))
        let f = try io("clip_io.safetensors")
        let pixels = try f.floats("pixel_values")
        let b = 2, c = model.config.visionConfig
        let norms = CLIPVisionNorms(model.visionModel)
        for (name, layers) in [("vision_hidden_1", 1), ("vision_last_hidden", c.numHiddenLayers)] {
            let h = pixels.withUnsafeBufferPointer {
                model.visionHiddenStates(pixels: $0.baseAddress!, batch: b, prompts: nil, promptCount: 0, norms: norms, layerCount: layers, tape: nil)
            }
            compare("CLIP vision \(name)", h.array, try f.floats(name), relTol: 1e-4)
        }
        compare("CLIP image features", model.getImageFeatures(pixels: pixels, batch: b), try f.floats("image_features"), relTol: 1e-4)
        XCTAssertEqual(model.logitScale, try f.floats("logit_scale")[0])
    }

    func testCLIPText_runUpToEOS_matchesTransformersOnPaddedInput() throws {
        let model = try CLIPModel(folder: fixtures.appendingPathComponent("clip"))
        let f = try io("clip_io.safetensors")
        let ids = try f.floats("input_ids").map { Int32($0) }
        let rows = (0..<3).map { Array(ids[($0 * 16)..<(($0 + 1) * 16)]) }
        XCTAssertEqual(rows.map { model.poolingPosition($0) }, [4, 8, 15])
        compare("CLIP text features", model.getTextFeatures(rows), try f.floats("text_features"), relTol: 1e-4)
        // one sequence alone gives the same as within a batch
        compare("CLIP text features, alone", model.getTextFeatures([rows[1]]), Array(try f.floats("text_features")[40..<80]), relTol: 1e-4)
    }

    func testCLIPPromptTuning_gradientsOfPromptsLayerNormsAndHead_matchTorchAutograd() throws {
        let model = try CLIPModel(folder: fixtures.appendingPathComponent("clip"))
        let f = try io("clip_io.safetensors")
        let pixels = try f.floats("pixel_values")
        let labels = try f.floats("labels").map { Int($0) }
        let state = CLIPPromptTuning(model: model, prompts: try f.floats("prompts"), promptCount: 4,
                                     head: try f.floats("head"), classCount: 5, normalizesFeatures: true)
        var logitsSeen: [Float] = []
        // two micro-batches of one image accumulate to the gradient of the mean loss over both
        var total: Float = 0
        for bi in 0..<2 {
            let one = Array(pixels[(bi * 3 * 32 * 32)..<((bi + 1) * 3 * 32 * 32)])
            total += one.withUnsafeBufferPointer { px in
                model.promptTuningStep(state, pixels: px.baseAddress!, batch: 1) { logits, dlogits in
                    logitsSeen += Array(UnsafeBufferPointer(start: logits, count: 5))
                    let l = crossEntropyForwardBackward(dlogits: dlogits, logits, labels: [labels[bi]], n: 1, c: 5, smoothing: 0.1)
                    for j in 0..<5 { dlogits[j] /= 2 }
                    return l / 2
                }
            }
        }
        compare("prompt logits", logitsSeen, try f.floats("prompt_logits"), relTol: 1e-4)
        XCTAssertEqual(total, try f.floats("prompt_loss")[0], accuracy: 1e-4)
        let params = state.parameters
        XCTAssertEqual(params.count, 2 + 2 * (2 + 2 * 3))
        for p in params {
            compare("grad \(p.name)", p.grad.array, try f.floats("grad." + p.name), relTol: 1e-3)
        }
        // inference with the tuned state reproduces the forward
        let (features, logits) = pixels.withUnsafeBufferPointer { model.promptTunedLogits(state, pixels: $0.baseAddress!, batch: 2) }
        compare("prompt features", features, try f.floats("prompt_features"), relTol: 1e-4)
        compare("prompt logits (batched)", logits, try f.floats("prompt_logits"), relTol: 1e-4)
        state.zeroGrads()
        XCTAssertEqual(state.parameters.map { $0.grad.array.map(abs).max()! }.max(), 0)
    }

    func testCLIPLoading_missingExtraOrMisshapenTensor_throwsNamingIt() throws {
        let folder = fixtures.appendingPathComponent("clip")
        let config = try CLIPConfig(folder: folder)
        let real = try openCheckpoint(folder: folder)
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
        let name = "vision_model.encoder.layers.1.mlp.fc1.weight"
        XCTAssertThrowsError(try CLIPModel(config: config, weights: Edited(base: real, drop: name))) {
            XCTAssertEqual($0 as? CheckpointError, .missingTensor(name)); print($0)
        }
        XCTAssertThrowsError(try CLIPModel(config: config, weights: Edited(base: real, add: "extra.weight"))) {
            XCTAssertEqual($0 as? CheckpointError, .unexpectedTensor("extra.weight")); print($0)
        }
        XCTAssertThrowsError(try CLIPModel(config: config, weights: Edited(base: real, reshape: (name, [128, 65])))) {
            XCTAssertEqual($0 as? CheckpointError, .shapeMismatch(name: name, expected: [128, 64], found: [128, 65])); print($0)
        }
    }
}

final class ViTParityTests: XCTestCase {
    /// Each test runs with two kernel threads, bound to the test's thread.
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    func check(_ family: String, height: Int, width: Int) throws {
        let model = try ViTModel(folder: fixtures.appendingPathComponent(family))
        let f = try io("\(family)_io.safetensors")
        let pixels = try f.floats("pixel_values")
        for (name, layers) in [("hidden_1", 1), ("last_hidden", model.config.numHiddenLayers)] {
            let h = pixels.withUnsafeBufferPointer {
                model.hiddenStates(pixels: $0.baseAddress!, batch: 2, height: height, width: width, layerCount: layers)
            }
            compare("\(family) \(name)", h.array, try f.floats(name), relTol: 1e-4)
        }
        let cls = pixels.withUnsafeBufferPointer { model.clsFeatures(pixels: $0.baseAddress!, batch: 2, height: height, width: width) }
        compare("\(family) CLS", cls, try f.floats("cls"), relTol: 1e-4)
    }

    /// DINO ViT saved as safetensors F16 (the reference ran the F16-rounded weights in float32).
    func testDINOViT_fromF16Checkpoint_matchesTransformers() throws {
        try check("dino", height: 32, width: 32)
    }

    /// `torch.save(model.state_dict())` under transformers 5 keeps its in-memory names (ViT: `layers.0.attention.q_proj`,
    /// DINOv2: `encoder.layer.0.attention.q_proj`); both load (fixtures from reference/make_state_dict_fixtures.py).
    func testStateDictWithTransformers5InMemoryNames_loadsAndMatches() throws {
        let f = try io("state_dict_io.safetensors")
        for (family, height, width) in [("vit", 32, 32), ("dinov2", 28, 42)] {
            let model = try ViTModel(folder: fixtures.appendingPathComponent("\(family)-state-dict"))
            let pixels = try f.floats("\(family).pixel_values")
            let cls = pixels.withUnsafeBufferPointer { model.clsFeatures(pixels: $0.baseAddress!, batch: 2, height: height, width: width) }
            compare("\(family) state dict CLS", cls, try f.floats("\(family).cls"), relTol: 1e-4)
        }
        XCTAssertEqual(TransformersInMemoryNames.checkpointName("layers.3.attention.o_proj.bias"), "encoder.layer.3.attention.output.dense.bias")
        XCTAssertEqual(TransformersInMemoryNames.checkpointName("vit.layers.0.mlp.fc1.weight"), "vit.encoder.layer.0.intermediate.dense.weight")
        XCTAssertEqual(TransformersInMemoryNames.checkpointName("encoder.layer.1.attention.k_proj.weight"), "encoder.layer.1.attention.attention.key.weight")
        XCTAssertNil(TransformersInMemoryNames.checkpointName("encoder.layer.1.mlp.fc1.weight"), "DINOv2's MLP names are the same in both")
    }

    /// DINOv2 from a pytorch_model.bin, on a 56×70 input: 4×5 patches, position embeddings interpolated from the 3×3 grid.
    func testDinov2_withLayerScaleAndInterpolatedPositions_matchesTransformers() throws {
        try check("dinov2", height: 56, width: 70)
    }
}

final class ModelConfigTests: XCTestCase {
    func testLegacyEOSTokenId2_poolsAtHighestId_likeTransformers() throws {
        let folder = fixtures.appendingPathComponent("clip")
        var config = try CLIPConfig(folder: folder)
        config.textConfig.eosTokenId = 2
        let model = try CLIPModel(config: config, weights: try openCheckpoint(folder: folder))
        XCTAssertEqual(model.poolingPosition([998, 5, 999, 0, 0]), 2)
        XCTAssertEqual(model.poolingPosition([998, 2, 7, 999, 999]), 3)
        let f = try io("clip_io.safetensors")
        let ids = try f.floats("input_ids").map { Int32($0) }
        let rows = (0..<3).map { Array(ids[($0 * 16)..<(($0 + 1) * 16)]) }
        compare("CLIP text features, legacy EOS pooling", model.getTextFeatures(rows), try f.floats("text_features"), relTol: 1e-4)
    }

    func testConfig_unsupportedActivationOrModelType_throwsNamingTheFile() throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-config-\(UUID())")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        let configFile = tmp.appendingPathComponent("config.json")
        try Data(#"{"model_type": "clip", "vision_config": {"hidden_act": "relu"}}"#.utf8).write(to: configFile)
        XCTAssertThrowsError(try CLIPConfig(folder: tmp)) {
            print($0)
            guard case .badConfig(let file, let reason)? = $0 as? CheckpointError else { return XCTFail("\($0)") }
            XCTAssertEqual(file, configFile.path)
            XCTAssertTrue(reason.contains("hidden_act"))
        }
        try Data(#"{"model_type": "clip", "text_config": {"max_position_embeddings": 1}}"#.utf8).write(to: configFile)
        XCTAssertThrowsError(try CLIPConfig(folder: tmp)) {
            guard case .badConfig(_, let reason)? = $0 as? CheckpointError else { return XCTFail("\($0)") }
            XCTAssertTrue(reason.contains("max_position_embeddings 1 leaves no room"), reason)
        }
        try Data(#"{"model_type": "bert"}"#.utf8).write(to: configFile)
        XCTAssertThrowsError(try ViTModel(folder: tmp)) {
            print($0)
            guard case .badConfig(_, let reason)? = $0 as? CheckpointError else { return XCTFail("\($0)") }
            XCTAssertTrue(reason.contains("bert"))
        }
        try Data(#"{"model_type": "vit", "hidden_size": 64, "num_attention_heads": 5}"#.utf8).write(to: configFile)
        XCTAssertThrowsError(try ViTModel(folder: tmp)) { print($0); XCTAssertNotNil($0 as? CheckpointError) }
    }

    func testCLIPConfig_legacyConfigDict_overridesSubConfig_likeTransformers() throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-configdict-\(UUID())")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        try Data(#"{"model_type": "clip", "text_config": {"hidden_size": 256, "eos_token_id": 7}, "text_config_dict": {"hidden_size": 384}, "vision_config": {"patch_size": 16}, "vision_config_dict": null}"#.utf8)
            .write(to: tmp.appendingPathComponent("config.json"))
        let config = try CLIPConfig(folder: tmp)
        XCTAssertEqual(config.textConfig.hiddenSize, 384)
        XCTAssertEqual(config.textConfig.eosTokenId, 49407)   // the dict's default, as transformers
        XCTAssertEqual(config.visionConfig.patchSize, 16)
    }

    func testViTModel_missingWeightsFile_throwsMissingFile() throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-noweights-\(UUID())")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        try FileManager.default.copyItem(at: fixtures.appendingPathComponent("dino/config.json"), to: tmp.appendingPathComponent("config.json"))
        XCTAssertThrowsError(try ViTModel(folder: tmp)) {
            print($0)
            guard case .missingFile? = $0 as? CheckpointError else { return XCTFail("\($0)") }
        }
    }
}
