import Foundation
import XCTest
@testable import Method

/// Each stage against reference/make_method_fixtures.py (PyTorch, after the public NoLA code).
final class ReferenceParityTests: XCTestCase {
    func testStage1_classifier_matchesReference() throws {
        let s = Fixture.section("stage1")
        let d = s.int("dim")
        let embeddings = (s["embeddings"] as! [[Any]]).map { $0.map { Float(($0 as! NSNumber).doubleValue) } }
        let classifier = try buildClassifier(embeddings: embeddings, dimension: d)
        assertClose(classifier, s.floats("classifier"), tolerance: 1e-6, "stage 1 classifier")
    }

    func testStage2_zeroShotProbabilitiesAndSelection_matchReference() throws {
        let s1 = Fixture.section("stage1"), s = Fixture.section("stage2_zero_shot")
        let c = s1.int("classes"), d = s1.int("dim")
        let probabilities = try zeroShotProbabilities(imageFeatures: s.floats("image_features"), classifier: s1.floats("classifier"),
                                                      dimension: d, logitScale: Float(s.double("logit_scale")))
        assertClose(probabilities, s.floats("probabilities"), tolerance: 2e-5, "stage 2 zero-shot probabilities")
        XCTAssertEqual(argmaxRows(probabilities, columns: c).labels, s.ints("zero_shot_labels"))

        var parameters = NolaParameters()
        parameters.minK = s.int("min_k")
        parameters.kFraction = s.double("k_fraction")
        let k = parameters.k(imageCount: s.int("n"), classCount: c)
        XCTAssertEqual(k, s.int("k"))
        // Select on the reference's probabilities so the comparison is of the selection rule alone.
        let selection = selectPseudoLabels(probabilities: s.floats("probabilities"), classCount: c, k: k)
        XCTAssertEqual(selection.indices, s.ints("selected_indices"))
        XCTAssertEqual(selection.labels, s.ints("selected_labels"))
        XCTAssertEqual(selection.rankUsed, s.ints("rank_used"))
        XCTAssertEqual(selection.countPerClass.reduce(0, +), selection.indices.count)
        // And on ours: same selection.
        XCTAssertEqual(selectPseudoLabels(probabilities: probabilities, classCount: c, k: k).indices, s.ints("selected_indices"))
    }

    func testStage2_alignmentModuleTraining_matchesReference() throws {
        let s = Fixture.section("stage2_alignment"), z = Fixture.section("stage2_zero_shot"), s1 = Fixture.section("stage1")
        let c = s1.int("classes"), d = s.int("dim"), h = s.int("hidden")
        let dino = s.floats("dino_features")
        let indices = z.ints("selected_indices"), labels = z.ints("selected_labels")
        var x = [Float]()
        for i in indices { x += dino[(i * d)..<((i + 1) * d)] }
        let initial = s.dict("initial"), trained = s.dict("trained")
        var module = AlignmentModule(inputSize: d, hiddenSize: h, classCount: c,
                                     fc1Weight: initial.floats("0.weight"), fc1Bias: initial.floats("0.bias"),
                                     fc2Weight: initial.floats("2.weight"), fc2Bias: initial.floats("2.bias"))
        let orders = (s["orders"] as! [[Any]]).map { $0.map { ($0 as! NSNumber).intValue } }
        var losses: [Double] = []
        try trainAlignmentModule(&module, features: x, labels: labels, epochs: s.int("epochs"), batchSize: s.int("batch"),
                                 learningRate: s.double("lr"), seed: 0, order: { orders[$0] },
                                 onEpoch: { losses.append($1) })
        assertClose(module.fc1Weight, trained.floats("0.weight"), tolerance: 2e-5, "alignment fc1.weight after 50 epochs")
        assertClose(module.fc1Bias, trained.floats("0.bias"), tolerance: 2e-5, "alignment fc1.bias after 50 epochs")
        assertClose(module.fc2Weight, trained.floats("2.weight"), tolerance: 2e-5, "alignment fc2.weight after 50 epochs")
        assertClose(module.fc2Bias, trained.floats("2.bias"), tolerance: 2e-5, "alignment fc2.bias after 50 epochs")
        assertClose(losses.map(Float.init), s.floats("epoch_losses"), tolerance: 1e-5, "alignment epoch losses")
        assertClose(module.probabilities(features: dino), s.floats("probabilities"), tolerance: 2e-5, "alignment probabilities")
        XCTAssertEqual(module.labels(features: dino), s.ints("teacher_labels"))
    }

    func testStage3_labelSmoothingAndAdamW_matchReference() {
        let s = Fixture.section("stage3_pieces")
        let targets = s.ints("targets")
        var grad = [Float](repeating: 0, count: s.floats("logits").count)
        let loss = smoothedCrossEntropy(s.floats("logits"), targets: targets, classCount: 5, smoothing: Float(s.double("smoothing")),
                                        logicalBatch: targets.count, dLogits: &grad)
        assertClose([Float(loss / Double(targets.count))], [Float(s.double("loss"))], tolerance: 2e-6, "label-smoothing loss")
        assertClose(grad, s.floats("grad"), tolerance: 1e-7, "label-smoothing gradient")

        let a = s.dict("adamw")
        var p = a.floats("initial")
        var moments = AdamMoments(count: p.count)
        let hyper = AdamHyperparameters(learningRate: a.double("lr"), weightDecay: a.double("weight_decay"))
        for (step, g) in (a["grads"] as! [[Any]]).enumerated() {
            adamStep(parameter: &p, gradient: g.map { Float(($0 as! NSNumber).doubleValue) }, moments: &moments, step: step + 1, hyper)
        }
        assertClose(p, a.floats("final"), tolerance: 1e-7, "AdamW parameter after 3 steps")
        assertClose(moments.m, a.floats("exp_avg"), tolerance: 1e-7, "AdamW exp_avg")
        assertClose(moments.v, a.floats("exp_avg_sq"), tolerance: 1e-7, "AdamW exp_avg_sq")
    }

    /// The toy encoder of the fixture, its strong views and its initial state.
    static func toySetup() -> (ToyEncoder, PromptTuningState, [Float], [Int], [Int: [Int]], [String: Any]) {
        let s = Fixture.section("stage3_loop"), s1 = Fixture.section("stage1")
        let w = s.int("width"), tokens = s.int("tokens"), p = s.int("prompt_count"), e = s1.int("dim")
        let initial = s.dict("initial")
        let encoder = ToyEncoder(hiddenSize: w, featureSize: e, tokens: tokens, proj: s.floats("proj"),
                                 initialGamma: initial.floats("post_layernorm.weight"), initialBeta: initial.floats("post_layernorm.bias"))
        let classifier = s1.floats("classifier")
        var state = PromptTuningState(encoder: encoder, classifier: classifier, promptCount: p, seed: 1)
        state.prompts.values = initial.floats("prompts")
        let orders = (s["orders"] as! [[Any]]).enumerated().reduce(into: [Int: [Int]]()) {
            $0[$1.offset] = $1.element.map { ($0 as! NSNumber).intValue }
        }
        return (encoder, state, s.floats("pixels"), Fixture.section("stage2_alignment").ints("teacher_labels"), orders, s)
    }

    /// strong_view(i, epoch) of the reference script.
    static func strongViews(_ pixels: [Float], perImage: Int) -> ([Int], Int) -> [Float] {
        { indices, epoch in
            indices.flatMap { i in pixels[(i * perImage)..<((i + 1) * perImage)].map { $0 * (1 + 0.1 * Float(epoch)) + 0.05 * Float(epoch + 1) } }
        }
    }

    func testStage3And4_promptTuningLoopAndLabels_matchReference() throws {
        let (encoder, initialState, pixels, teacher, orders, s) = Self.toySetup()
        var state = initialState
        var metrics: [PromptTuningEpoch] = []
        var steps = 0
        try runPromptTuning(encoder: encoder, state: &state, teacherLabels: teacher, epochs: s.int("epochs"),
                            batchSize: s.int("logical_batch"), microBatchSize: s.int("micro_batch"), learningRate: s.double("lr"),
                            weightDecay: s.double("weight_decay"), labelSmoothing: s.double("smoothing"), seed: 1,
                            strongViews: Self.strongViews(pixels, perImage: encoder.tokens * encoder.hiddenSize),
                            order: { orders[$0]! }, onStep: { _, _ in steps += 1 }, onEpoch: { m, _ in metrics.append(m) })
        let final = s.dict("final")
        XCTAssertEqual(state.step, s.int("steps"))
        XCTAssertEqual(steps, s.int("steps"))
        assertClose(state.prompts.values, final.floats("prompts"), tolerance: 1e-6, "prompts after prompt tuning")
        assertClose(state.layerNorms[0].values, final.floats("post_layernorm.weight"), tolerance: 1e-6, "LayerNorm weight after prompt tuning")
        assertClose(state.layerNorms[1].values, final.floats("post_layernorm.bias"), tolerance: 1e-6, "LayerNorm bias after prompt tuning")
        assertClose(state.head.values, final.floats("head"), tolerance: 1e-6, "head after prompt tuning")
        assertClose(state.moments[0].v, s.floats("final_exp_avg_sq_prompts"), tolerance: 1e-9, "prompts exp_avg_sq")
        let reference = s["epoch_metrics"] as! [[String: Any]]
        assertClose(metrics.map { Float($0.meanLoss) }, reference.map { Float($0.double("loss")) }, tolerance: 1e-5, "epoch mean loss")
        XCTAssertEqual(metrics.map(\.agreement), reference.map { $0.double("agreement") })

        let features = try encoder.features(pixels: pixels, batch: teacher.count, prompts: state.prompts.values, layerNorms: state.layerNorms)
        let (labels, confidences) = labelImages(features: features, head: state.head.values, classCount: state.head.shape[0])
        XCTAssertEqual(labels, s.ints("labels"))
        assertClose(confidences, s.floats("confidences"), tolerance: 1e-5, "stage 4 confidences")
    }
}
