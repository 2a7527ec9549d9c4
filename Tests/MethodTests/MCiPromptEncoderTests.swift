import Foundation
import Kernels
import Models
import XCTest
@testable import Method

/// The MCi tower's tuned variant through the method's trainer: no prompt tokens (prompts (0, W)), the
/// attention stage's norms and layer scales in the place of the LayerNorms, and the state with its (0, W)
/// prompts through checkpoints and the results blob. The tiny tower of Tests/ModelsTests/Fixtures
/// (reference/make_mobileclip_fixtures.py).
final class MCiPromptEncoderTests: XCTestCase {
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    static let modelFixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("ModelsTests/Fixtures")

    static func encoder() throws -> (MCiPromptEncoder, [Float]) {
        var c = MCiConfig(layers: [1, 1, 1, 2], embedDims: [8, 16, 32, 64], mlpRatios: [3, 3, 3, 2],
                          seDownsamples: [false, false, true, true], tokenMixers: [.repmixer, .repmixer, .repmixer, .attention],
                          posEmbs: [false, false, false, true], embedDim: 12, imageSize: 96)
        c.lkcUseAct = true
        let model = try MCiModel(config: c, weights: try SafeTensorsFile(url: modelFixtures.appendingPathComponent("mci-train.safetensors")))
        let pixels = try SafeTensorsFile(url: modelFixtures.appendingPathComponent("mci_io.safetensors")).floats("pixel_values")
        return (MCiPromptEncoder(model: model), pixels)
    }

    func temporaryFile(_ bytes: [UInt8]) throws -> SafeTensorsFile {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("mci-\(UUID().uuidString).safetensors")
        try Data(bytes).write(to: url)
        defer { try? FileManager.default.removeItem(at: url) }
        return try SafeTensorsFile(url: url)
    }

    func testMCiTuning_trainsNormsAndHead_andItsZeroPromptStateRoundTrips() throws {
        let (encoder, pixels) = try Self.encoder()
        XCTAssertEqual(encoder.hiddenSize, 64)
        XCTAssertEqual(encoder.featureSize, 12)
        var random = SeededRandom(seed: 5, stream: "test head")
        let classifier = (0..<(3 * 12)).map { _ in random.uniform(-0.3, 0.3) }
        var state = PromptTuningState(encoder: encoder, classifier: classifier, promptCount: 0, seed: 1)
        XCTAssertEqual(state.prompts.shape, [0, 64])
        XCTAssertEqual(state.layerNorms.map(\.name).prefix(4), ["visual.trunk.stages.3.blocks.0.norm.weight", "visual.trunk.stages.3.blocks.0.norm.bias",
                                                                "visual.trunk.stages.3.blocks.0.layer_scale_1.gamma", "visual.trunk.stages.3.blocks.0.layer_scale_2.gamma"])
        let initial = state
        let image = 3 * 96 * 96
        try runPromptTuning(encoder: encoder, state: &state, teacherLabels: [2, 0], epochs: 2, batchSize: 2, microBatchSize: 1,
                            learningRate: 0.01, weightDecay: 0.01, labelSmoothing: 0.1, seed: 3,
                            strongViews: { indices, _ in indices.flatMap { pixels[($0 * image)..<(($0 + 1) * image)] } })
        XCTAssertEqual(state.step, 2)
        XCTAssertEqual(state.epoch, 2)
        XCTAssertNotEqual(state.head, initial.head)
        for (now, before) in zip(state.layerNorms, initial.layerNorms) { XCTAssertNotEqual(now.values, before.values, now.name) }
        XCTAssertTrue(state.prompts.values.isEmpty)

        // checkpoint and restore, through the safetensors bytes the daemon stores
        let restored = try PromptTuningState.restore(checkpointSafeTensors: try temporaryFile(state.checkpointSafeTensors(teacherLabels: [2, 0])))
        XCTAssertEqual(restored.state, state)
        XCTAssertEqual(restored.state.prompts.shape, [0, 64])
        // the results blob loads for inference on the same tower, and gives the tuned features
        let blob = try temporaryFile(state.resultsSafeTensors(metadata: [:]))
        let loaded = try PromptTuningState(resultsSafeTensors: blob, encoder: encoder)
        XCTAssertEqual(loaded.learnedTensors(), state.learnedTensors())
        let tuned = try encoder.features(pixels: pixels, batch: 2, prompts: [], layerNorms: loaded.layerNorms)
        let plain = try encoder.features(pixels: pixels, batch: 2, prompts: [], layerNorms: initial.layerNorms)
        XCTAssertEqual(plain, encoder.model.imageFeatures(pixels: pixels, batch: 2))
        XCTAssertNotEqual(tuned, plain)
    }
}
