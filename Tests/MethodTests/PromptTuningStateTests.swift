import Foundation
import XCTest
@testable import Method

final class PromptTuningStateTests: XCTestCase {
    func run(_ state: inout PromptTuningState, stopAfterMicroBatches: Int? = nil, epochs: Int = 3, stopRule: PromptStopRule = .off,
             stepBudget: Int? = nil,
             checkpoints: inout [(tensors: [NamedTensor], metadata: [String: String])],
             epochMetrics: ((PromptTuningEpoch) -> Void)? = nil) throws {
        let (encoder, _, pixels, teacher, _, _) = ReferenceParityTests.toySetup()
        var microBatches = 0
        try runPromptTuning(encoder: encoder, state: &state, teacherLabels: teacher, epochs: epochs, batchSize: 16,
                            microBatchSize: 5, learningRate: 0.01, weightDecay: 0.01, labelSmoothing: 0.1, seed: 99,
                            stopRule: stopRule, stepBudget: stepBudget,
                            strongViews: ReferenceParityTests.strongViews(pixels, perImage: encoder.tokens * encoder.hiddenSize),
                            shouldStop: {
                                defer { microBatches += 1 }
                                return stopAfterMicroBatches.map { microBatches >= $0 } ?? false
                            },
                            onStep: { _, s in checkpoints.append(s.checkpoint()) },
                            onEpoch: { e, s in checkpoints.append(s.checkpoint()); epochMetrics?(e) })
    }

    /// The stopping rule reads only what the state keeps, so it stops a resumed run where it stops an
    /// uninterrupted one, and a state that has stopped trains no further when resumed.
    func testStopRule_stopsAfterPatienceStableEpochs_andAResumedRunStopsAtTheSameEpoch() throws {
        let (_, initial, _, _, _, _) = ReferenceParityTests.toySetup()
        // Tolerance 1: every epoch after the first is stable (both metrics are fractions), so patience 2
        // stops after epoch 3 of 10.
        let rule = PromptStopRule(patience: 2, tolerance: 1)
        var uninterrupted = initial
        var saved: [(tensors: [NamedTensor], metadata: [String: String])] = []
        var epochs: [PromptTuningEpoch] = []
        try run(&uninterrupted, epochs: 10, stopRule: rule, checkpoints: &saved, epochMetrics: { epochs.append($0) })
        XCTAssertEqual(uninterrupted.epoch, 3)
        XCTAssertTrue(uninterrupted.stoppedEarly)
        XCTAssertEqual(epochs.map(\.stableEpochs), [0, 1, 2])
        XCTAssertEqual(epochs.map { $0.stopReason != nil }, [false, false, true])
        XCTAssertEqual(epochs.last?.stopReason, rule.reason)
        XCTAssertTrue(epochs.allSatisfy { $0.meanConfidence > 1 / Double(initial.head.shape[0]) && $0.meanConfidence <= 1 }, "\(epochs.map(\.meanConfidence))")

        // Interrupted mid-epoch 2 (after 25 micro-batches), restored from the last checkpoint: the same end.
        var interrupted = initial
        saved = []
        XCTAssertThrowsError(try run(&interrupted, stopAfterMicroBatches: 25, epochs: 10, stopRule: rule, checkpoints: &saved))
        XCTAssertEqual(interrupted.epoch, 2)
        XCTAssertEqual(interrupted.stableEpochs, 1)
        var resumed = try PromptTuningState(checkpoint: saved.last!.tensors, metadata: saved.last!.metadata)
        XCTAssertEqual(resumed, interrupted)
        var more: [(tensors: [NamedTensor], metadata: [String: String])] = []
        try run(&resumed, epochs: 10, stopRule: rule, checkpoints: &more)
        XCTAssertEqual(resumed, uninterrupted)

        // The stopped state, restored from its checkpoint, takes no further step.
        var again = try PromptTuningState(checkpoint: uninterrupted.checkpoint().tensors, metadata: uninterrupted.checkpoint().metadata)
        XCTAssertEqual(again, uninterrupted)
        try run(&again, epochs: 10, stopRule: rule, checkpoints: &more)
        XCTAssertEqual(again, uninterrupted)

        // Off, or a tolerance nothing meets: every epoch runs.
        for other in [PromptStopRule.off, PromptStopRule(patience: 2, tolerance: 1e-12)] {
            var full = initial
            try run(&full, epochs: 5, stopRule: other, checkpoints: &more)
            XCTAssertEqual(full.epoch, 5)
            XCTAssertFalse(full.stoppedEarly)
        }
    }

    /// The training budget ends tuning at its step, mid-epoch or at an epoch's end, on the trajectory of
    /// the uncapped run; a state at the budget takes no further step when resumed with it, and one resumed
    /// without it ends like the uncapped run.
    func testStepBudget_endsAtTheCapOnTheUncappedTrajectory_andAResumedRunHonoursIt() throws {
        let (_, initial, _, _, _, _) = ReferenceParityTests.toySetup()
        var uncapped = initial
        var steps: [(tensors: [NamedTensor], metadata: [String: String])] = []
        try run(&uncapped, checkpoints: &steps)
        XCTAssertEqual(uncapped.step, 9) // 3 epochs × ⌊60/16⌋ batches
        func afterStep(_ k: Int) throws -> PromptTuningState {
            let saved = try XCTUnwrap(steps.first { $0.metadata["step"] == String(k) })
            return try PromptTuningState(checkpoint: saved.tensors, metadata: saved.metadata)
        }

        // A budget of 4 steps: it stops after the first batch of epoch 2, where the uncapped run was after step 4.
        var capped = initial
        var saved: [(tensors: [NamedTensor], metadata: [String: String])] = []
        var epochs = 0
        try run(&capped, stepBudget: 4, checkpoints: &saved, epochMetrics: { _ in epochs += 1 })
        XCTAssertEqual(capped.step, 4)
        XCTAssertEqual(capped.epoch, 1)
        XCTAssertEqual(capped.batchInEpoch, 1)
        XCTAssertEqual(epochs, 1)
        XCTAssertEqual(capped, try afterStep(4))

        // Resumed with the same budget: no micro-batch runs, nothing changes.
        var resumed = try PromptTuningState(checkpoint: saved.last!.tensors, metadata: saved.last!.metadata)
        XCTAssertEqual(resumed, capped)
        var more: [(tensors: [NamedTensor], metadata: [String: String])] = []
        try run(&resumed, stopAfterMicroBatches: 0, stepBudget: 4, checkpoints: &more)
        XCTAssertEqual(resumed, capped)
        XCTAssertTrue(more.isEmpty)
        // Resumed with a larger budget or none: the uncapped run's end.
        try run(&resumed, stepBudget: 1000, checkpoints: &more)
        XCTAssertEqual(resumed, uncapped)

        // A budget met at an epoch's last step closes that epoch (its metrics, the stopping rule) first.
        var atEpochEnd = initial
        epochs = 0
        try run(&atEpochEnd, stepBudget: 3, checkpoints: &saved, epochMetrics: { _ in epochs += 1 })
        XCTAssertEqual(atEpochEnd.step, 3)
        XCTAssertEqual(atEpochEnd.epoch, 1)
        XCTAssertEqual(atEpochEnd.batchInEpoch, 0)
        XCTAssertEqual(epochs, 1)
    }

    func testResume_afterCancellationMidEpoch_endsExactlyLikeAnUninterruptedRun() throws {
        let (_, initial, _, _, _, _) = ReferenceParityTests.toySetup()
        var uninterrupted = initial
        var saved: [(tensors: [NamedTensor], metadata: [String: String])] = []
        try run(&uninterrupted, checkpoints: &saved)
        XCTAssertEqual(uninterrupted.epoch, 3)
        XCTAssertEqual(uninterrupted.step, 9) // 3 epochs × ⌊60/16⌋ batches

        // Stop in the middle of epoch 1 (after 17 micro-batches: batches of 16 take 4 micro-batches of ≤ 5).
        var interrupted = initial
        saved = []
        XCTAssertThrowsError(try run(&interrupted, stopAfterMicroBatches: 17, checkpoints: &saved)) { error in
            XCTAssertEqual((error as? MethodError)?.code, .cancelled)
        }
        XCTAssertEqual(interrupted.step, 4)
        XCTAssertEqual(interrupted.epoch, 1)
        XCTAssertEqual(interrupted.batchInEpoch, 1)
        // A new process restores the last checkpoint and finishes.
        let last = saved.last!
        var resumed = try PromptTuningState(checkpoint: last.tensors, metadata: last.metadata)
        XCTAssertEqual(resumed, interrupted)
        var more: [(tensors: [NamedTensor], metadata: [String: String])] = []
        try run(&resumed, checkpoints: &more)
        XCTAssertEqual(resumed, uninterrupted)
    }

    func testCheckpoint_roundTrips_andNamesMissingTensors() throws {
        let (_, initial, _, _, _, _) = ReferenceParityTests.toySetup()
        var state = initial
        state.step = 7; state.epoch = 2; state.batchInEpoch = 1; state.epochLossSum = 3.25; state.epochAgreements = 5; state.epochImages = 16
        state.moments[1].m[0] = 0.5
        let (tensors, metadata) = state.checkpoint()
        XCTAssertEqual(tensors.map(\.name).prefix(4), ["prompt_embeddings", "post_layernorm.weight", "post_layernorm.bias", "head.weight"])
        XCTAssertEqual(tensors.count, 12)
        XCTAssertEqual(try PromptTuningState(checkpoint: tensors, metadata: metadata), state)
        XCTAssertEqual(state.learnedTensors().count, 4)

        XCTAssertThrowsError(try PromptTuningState(checkpoint: tensors.filter { $0.name != "head.weight.exp_avg_sq" }, metadata: metadata)) {
            XCTAssertEqual(($0 as? MethodError)?.subject, "head.weight.exp_avg_sq")
        }
        var bad = metadata
        bad["step"] = "x"
        XCTAssertThrowsError(try PromptTuningState(checkpoint: tensors, metadata: bad)) { XCTAssertEqual(($0 as? MethodError)?.subject, "step") }
        bad = metadata
        bad["format"] = nil
        XCTAssertThrowsError(try PromptTuningState(checkpoint: tensors, metadata: bad)) { XCTAssertEqual(($0 as? MethodError)?.code, .badState) }
    }

    func testInitialState_promptsUniformWithinReferenceBound_seeded() {
        let encoder = ToyEncoder(hiddenSize: 768, featureSize: 4, tokens: 1, proj: [],
                                 initialGamma: [Float](repeating: 1, count: 768), initialBeta: [Float](repeating: 0, count: 768))
        let classifier = [Float](repeating: 0.5, count: 8)
        let a = PromptTuningState(encoder: encoder, classifier: classifier, promptCount: 16, seed: 5)
        let b = PromptTuningState(encoder: encoder, classifier: classifier, promptCount: 16, seed: 5)
        let c = PromptTuningState(encoder: encoder, classifier: classifier, promptCount: 16, seed: 6)
        let bound = Float((6.0 / Double(3 * 16 * 16 + 768)).squareRoot()) // 0.0625 for ViT-B (W = 768)
        XCTAssertEqual(a.prompts.shape, [16, 768])
        XCTAssertEqual(a.head.shape, [2, 4])
        XCTAssertEqual(a.head.values, classifier)
        XCTAssertTrue(a.prompts.values.allSatisfy { abs($0) <= bound })
        XCTAssertGreaterThan(a.prompts.values.map(abs).max()!, 0.95 * bound)
        let mean = a.prompts.values.reduce(0, +) / Float(a.prompts.values.count)
        XCTAssertLessThan(abs(mean), 0.003)
        XCTAssertEqual(a, b)
        XCTAssertNotEqual(a.prompts, c.prompts)
    }

    func testDecayRule_followsReferenceNoDecayList() {
        XCTAssertTrue(PromptTuningState.decays("prompt_embeddings"))
        XCTAssertTrue(PromptTuningState.decays("head.weight"))
        XCTAssertTrue(PromptTuningState.decays("vision_model.encoder.layers.0.layer_norm1.weight"))
        XCTAssertFalse(PromptTuningState.decays("vision_model.encoder.layers.0.layer_norm1.bias"))
    }

    func testBatching_dropsLastPartialBatchOnlyWhenAFullOneExists() {
        XCTAssertEqual(promptBatches(order: Array(0..<10), batchSize: 4).map(Array.init), [[0, 1, 2, 3], [4, 5, 6, 7]])
        XCTAssertEqual(promptBatches(order: Array(0..<3), batchSize: 4).map(Array.init), [[0, 1, 2]])
        XCTAssertEqual(promptMicroBatchSize(memoryBudgetBytes: 1 << 30, bytesPerImage: 100 << 20, logicalBatch: 512), 10)
        XCTAssertEqual(promptMicroBatchSize(memoryBudgetBytes: 1, bytesPerImage: 100, logicalBatch: 512), 1)
        XCTAssertEqual(promptMicroBatchSize(memoryBudgetBytes: 1 << 40, bytesPerImage: 100, logicalBatch: 512), 512)
    }
}
