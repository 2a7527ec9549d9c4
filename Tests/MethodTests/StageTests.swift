import Foundation
import Models
import XCTest
@testable import Method

final class StageTests: XCTestCase {
    func temporaryFile(_ bytes: [UInt8]) throws -> SafeTensorsFile {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("method-\(UUID().uuidString).safetensors")
        try Data(bytes).write(to: url)
        defer { try? FileManager.default.removeItem(at: url) }
        return try SafeTensorsFile(url: url)
    }

    func testCheckpointSafeTensors_roundTrips() throws {
        let (_, initial, _, _, _, _) = ReferenceParityTests.toySetup()
        var state = initial
        state.step = 3; state.epoch = 1; state.batchInEpoch = 2; state.epochLossSum = 1.5; state.epochImages = 32
        state.moments[0].v[1] = 0.25
        let teacher = [0, 3, 1, 2, 2]
        let restored = try PromptTuningState.restore(checkpointSafeTensors: try temporaryFile(state.checkpointSafeTensors(teacherLabels: teacher)))
        XCTAssertEqual(restored.state, state)
        XCTAssertEqual(restored.teacherLabels, teacher)
        XCTAssertThrowsError(try PromptTuningState.restore(checkpointSafeTensors: try temporaryFile(state.checkpointSafeTensors(teacherLabels: [4])))) {
            XCTAssertEqual(($0 as? MethodError)?.subject, "teacher_labels")
        }
    }

    /// A checkpoint comes back from the database on resume: impossible shapes or position counters are
    /// refused with a `.badState` sentence. (A scalar head was indexed as (C, E) and trapped; a negative
    /// step reached AdamW's `step >= 1` precondition; a negative batch_in_epoch indexed before the epoch.)
    func testCheckpoint_withImpossibleShapesOrCounters_isRefusedWithASentence() throws {
        let (_, initial, _, _, _, _) = ReferenceParityTests.toySetup()
        let teacher = [0, 3, 1, 2, 2]
        let good = initial.checkpointSafeTensors(teacherLabels: teacher)
        func refusal(_ bytes: [UInt8]) -> String {
            do {
                _ = try PromptTuningState.restore(checkpointSafeTensors: try temporaryFile(bytes))
                return "no error"
            } catch {
                return "\(error)"
            }
        }
        XCTAssertEqual(refusal(good), "no error")
        let file = try temporaryFile(good)
        let tensors = try file.tensorNames.sorted().map { (name: $0, shape: file.shape(of: $0)!, values: try file.floats($0)) }
        func rewritten(metadata edit: [String: String] = [:], _ shape: (String, [Int]) -> [Int] = { $1 }) -> [UInt8] {
            writeSafeTensors(tensors: tensors.map { ($0.name, shape($0.name, $0.shape), $0.values) },
                             metadata: file.metadata.merging(edit) { $1 })
        }
        for key in ["step", "epoch", "batch_in_epoch", "epoch_agreements", "epoch_images"] {
            XCTAssertEqual(refusal(rewritten(metadata: [key: "-3"])), "training state '\(key)': -3 is negative")
        }
        XCTAssertEqual(refusal(rewritten(metadata: ["epoch_loss_sum": "nan"])), "training state 'epoch_loss_sum': nan is not a finite loss")
        XCTAssertEqual(refusal(rewritten(metadata: ["step": "three"])), "training state 'step': missing or not a number")
        // head.weight (and its moments) flattened to one dimension, prompts likewise.
        let head = initial.head.values.count, prompts = initial.prompts.values.count
        XCTAssertEqual(refusal(rewritten { $0.hasPrefix("head.weight") ? [head] : $1 }),
                       "training state 'head.weight': shape [\(head)], expected two dimensions")
        XCTAssertEqual(refusal(rewritten { $0.hasPrefix("prompt_embeddings") ? [1, 1, prompts] : $1 }),
                       "training state 'prompt_embeddings': shape [1, 1, \(prompts)], expected two dimensions")
        // A state of a one-value head stored as a scalar.
        var scalar = initial
        scalar.head = NamedTensor(name: "head.weight", shape: [], values: [0.5])
        scalar.moments[scalar.moments.count - 1] = AdamMoments(count: 1)
        XCTAssertEqual(refusal(scalar.checkpointSafeTensors(teacherLabels: [0])), "training state 'head.weight': shape [], expected two dimensions")
    }

    func testResultsSafeTensors_loadForInference_andCheckShapes() throws {
        let (encoder, initial, _, _, _, _) = ReferenceParityTests.toySetup()
        let file = try temporaryFile(initial.resultsSafeTensors(metadata: ["clip_model": "clip-vit-base-patch32"]))
        XCTAssertEqual(Set(file.tensorNames), ["prompt_embeddings", "post_layernorm.weight", "post_layernorm.bias", "head.weight"])
        XCTAssertEqual(file.metadata["clip_model"], "clip-vit-base-patch32")
        let loaded = try PromptTuningState(resultsSafeTensors: file, encoder: encoder)
        XCTAssertEqual(loaded.learnedTensors(), initial.learnedTensors())

        let wider = ToyEncoder(hiddenSize: 9, featureSize: encoder.featureSize, tokens: 1, proj: [],
                               initialGamma: [Float](repeating: 1, count: 9), initialBeta: [Float](repeating: 0, count: 9))
        XCTAssertThrowsError(try PromptTuningState(resultsSafeTensors: file, encoder: wider)) {
            XCTAssertEqual(($0 as? MethodError)?.subject, "prompt_embeddings")
        }
        let notResults = try temporaryFile(initial.checkpointSafeTensors(teacherLabels: [0]))
        XCTAssertThrowsError(try PromptTuningState(resultsSafeTensors: notResults, encoder: encoder)) {
            XCTAssertEqual(($0 as? MethodError)?.code, .badState)
        }
    }

    func testPseudoLabelStage_onReferenceFeatures_selectsLikeReference_andIsSeeded() throws {
        let s = Fixture.section("pipeline")
        let io = try SafeTensorsFile(url: PipelineParityTests.fixtures.appendingPathComponent("pipeline_io.safetensors"))
        var parameters = NolaParameters()
        parameters.minK = 3
        parameters.alignmentEpochs = 5
        parameters.alignmentHiddenSize = 8
        var epochs: [Int] = []
        let run = { try runPseudoLabelStage(clipFeatures: try io.floats("clip_features"), classifier: s.floats("classifier"), featureSize: 16,
                                            logitScale: Float(s.double("logit_scale")), dinoFeatures: try io.floats("dino_features"),
                                            dinoSize: 24, parameters: parameters, onAlignmentEpoch: { e, _ in epochs.append(e) }) }
        let a = try run()
        XCTAssertEqual(a.pseudoLabels.indices, s.ints("selected_indices"))
        XCTAssertEqual(a.pseudoLabels.labels, s.ints("selected_labels"))
        XCTAssertEqual(a.k, 3)
        XCTAssertEqual(a.alignmentLosses.count, 5)
        XCTAssertEqual(epochs, [0, 1, 2, 3, 4])
        XCTAssertEqual(a.teacherLabels.count, s.int("n"))
        XCTAssertEqual(a.zeroShotLabels, argmaxRows(s.floats("probabilities"), columns: 3).labels)
        let b = try run()
        XCTAssertEqual(a.alignmentModule, b.alignmentModule)
        parameters.seed = 8
        XCTAssertNotEqual(try run().alignmentModule, a.alignmentModule)

        XCTAssertThrowsError(try runPseudoLabelStage(clipFeatures: try io.floats("clip_features"), classifier: s.floats("classifier"),
                                                     featureSize: 16, logitScale: 1, dinoFeatures: try io.floats("dino_features"),
                                                     dinoSize: 24, parameters: parameters,
                                                     onAlignmentEpoch: { _, _ in throw MethodError(.cancelled, "job", "stopped") })) {
            XCTAssertEqual(($0 as? MethodError)?.code, .cancelled)
        }
    }
}

final class PromptTuningParametersTests: XCTestCase {
    func testRunWithParameters_equalsExplicitArguments_andStrongViewSeedsDiffer() throws {
        let (encoder, initial, pixels, teacher, _, _) = ReferenceParityTests.toySetup()
        var parameters = NolaParameters()
        parameters.promptEpochs = 2; parameters.promptBatchSize = 16; parameters.promptLearningRate = 0.02; parameters.seed = 4
        parameters.promptMicroBatchSize = 7
        let views = ReferenceParityTests.strongViews(pixels, perImage: encoder.tokens * encoder.hiddenSize)
        var a = initial, b = initial
        try runPromptTuning(encoder: encoder, state: &a, teacherLabels: teacher, parameters: parameters, strongViews: views)
        try runPromptTuning(encoder: encoder, state: &b, teacherLabels: teacher, epochs: 2, batchSize: 16, microBatchSize: 7,
                            learningRate: 0.02, weightDecay: 0.01, labelSmoothing: 0.1, seed: 4, strongViews: views)
        XCTAssertEqual(a, b)
        XCTAssertEqual(a.step, 6)
        let seeds = Set((0..<3).flatMap { e in (0..<100).map { strongViewSeed(jobSeed: 7, epoch: e, image: $0) } })
        XCTAssertEqual(seeds.count, 300)
        XCTAssertEqual(strongViewSeed(jobSeed: 7, epoch: 1, image: 5), strongViewSeed(jobSeed: 7, epoch: 1, image: 5))
    }
}
