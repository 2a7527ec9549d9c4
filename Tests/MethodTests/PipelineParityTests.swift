import Foundation
import Models
import XCTest
@testable import Method

/// The four stages end to end on tiny random CLIP and DINO models in Hugging Face layout, against the
/// reference script's PyTorch/transformers run with the same weights, views, data order and initial state.
final class PipelineParityTests: XCTestCase {
    static let fixtures = Fixture.url.deletingLastPathComponent()

    func testFourStages_onTinyCLIPAndDINO_matchReference() throws {
        let s = Fixture.section("pipeline")
        let clip = try CLIPModel(folder: Self.fixtures.appendingPathComponent("tiny-clip"))
        let dino = try ViTModel(folder: Self.fixtures.appendingPathComponent("tiny-dino"))
        let io = try SafeTensorsFile(url: Self.fixtures.appendingPathComponent("pipeline_io.safetensors"))
        let weak = try io.floats("weak_views")
        let n = s.int("n"), c = s.int("classes"), e = clip.projectionDim
        let side = clip.config.visionConfig.imageSize, perImage = 3 * side * side
        XCTAssertEqual(weak.count, n * perImage)

        // Stage 1: class vectors from the CLIP text encoder.
        let sentences = (s["sentences"] as! [[[Any]]]).map { $0.map { $0.map { Int32(($0 as! NSNumber).intValue) } } }
        let classifier = try buildClassifier(embeddings: sentences.map { clip.getTextFeatures($0) }, dimension: e)
        assertClose(classifier, s.floats("classifier"), tolerance: 1e-5, "pipeline classifier")

        // Stage 2: zero-shot, selection, DINO features, alignment module, teacher labels.
        let clipFeatures = clip.getImageFeatures(pixels: weak, batch: n)
        assertClose(clipFeatures, try io.floats("clip_features"), tolerance: 1e-4, "pipeline CLIP image features")
        let probabilities = try zeroShotProbabilities(imageFeatures: clipFeatures, classifier: classifier, dimension: e,
                                                      logitScale: exp(clip.logitScale))
        assertClose(probabilities, s.floats("probabilities"), tolerance: 1e-4, "pipeline zero-shot probabilities")
        var parameters = NolaParameters()
        parameters.minK = 3
        let k = parameters.k(imageCount: n, classCount: c)
        XCTAssertEqual(k, s.int("k"))
        let selection = selectPseudoLabels(probabilities: probabilities, classCount: c, k: k)
        XCTAssertEqual(selection.indices, s.ints("selected_indices"))
        XCTAssertEqual(selection.labels, s.ints("selected_labels"))

        let dinoFeatures = weak.withUnsafeBufferPointer { dino.clsFeatures(pixels: $0.baseAddress!, batch: n, height: side, width: side) }
        assertClose(dinoFeatures, try io.floats("dino_features"), tolerance: 1e-4, "pipeline DINO CLS features")
        let d = dino.config.hiddenSize
        let a = s.dict("alignment"), initial = a.dict("initial")
        var module = AlignmentModule(inputSize: d, hiddenSize: a.int("hidden"), classCount: c,
                                     fc1Weight: initial.floats("0.weight"), fc1Bias: initial.floats("0.bias"),
                                     fc2Weight: initial.floats("2.weight"), fc2Bias: initial.floats("2.bias"))
        let alignmentOrders = (a["orders"] as! [[Any]]).map { $0.map { ($0 as! NSNumber).intValue } }
        try trainAlignmentModule(&module, features: selection.indices.flatMap { dinoFeatures[($0 * d)..<(($0 + 1) * d)] },
                                 labels: selection.labels, epochs: a.int("epochs"), batchSize: a.int("batch"),
                                 learningRate: a.double("lr"), seed: 0, order: { alignmentOrders[$0] })
        assertClose(module.fc2Weight, a.dict("trained").floats("2.weight"), tolerance: 1e-4, "pipeline alignment fc2.weight")
        let teacher = module.labels(features: dinoFeatures)
        XCTAssertEqual(teacher, s.ints("teacher_labels"))

        // Stage 3: prompt tuning through the Models layer's CLIP step.
        let encoder = CLIPPromptEncoder(model: clip, promptCount: s.int("prompt_count"))
        var state = PromptTuningState(encoder: encoder, classifier: classifier, promptCount: s.int("prompt_count"), seed: 0)
        state.prompts.values = s.floats("initial_prompts")
        let orders = (s["orders"] as! [[Any]]).map { $0.map { ($0 as! NSNumber).intValue } }
        var metrics: [PromptTuningEpoch] = []
        try runPromptTuning(encoder: encoder, state: &state, teacherLabels: teacher, epochs: s.int("epochs"),
                            batchSize: s.int("logical_batch"), microBatchSize: s.int("micro_batch"), learningRate: s.double("lr"),
                            weightDecay: 0.01, labelSmoothing: 0.1, seed: 0,
                            strongViews: { indices, epoch in indices.flatMap { Self.strongView(weak, $0, epoch, side: side) } },
                            order: { orders[$0] }, onEpoch: { m, _ in metrics.append(m) })
        let final = s.dict("final")
        let learned = state.learnedTensors()
        XCTAssertEqual(Set(learned.map(\.name)), Set(final.keys))
        var worst: Float = 0
        for tensor in learned {
            let reference = final.floats(tensor.name)
            let error = zip(tensor.values, reference).map { abs($0 - $1) }.max() ?? .infinity
            worst = max(worst, error)
            XCTAssertLessThanOrEqual(error, 2e-5, "\(tensor.name): max abs error \(error)")
        }
        print("pipeline prompt tuning: max abs error over \(learned.count) learned tensors \(worst) (tolerance 2e-5)")
        let reference = s["epoch_metrics"] as! [[String: Any]]
        assertClose(metrics.map { Float($0.meanLoss) }, reference.map { Float($0.double("loss")) }, tolerance: 1e-4, "pipeline epoch loss")
        XCTAssertEqual(metrics.map(\.agreement), reference.map { $0.double("agreement") })

        // Stage 4: labels of the weak views.
        let features = try encoder.features(pixels: weak, batch: n, prompts: state.prompts.values, layerNorms: state.layerNorms)
        let (labels, confidences) = labelImages(features: features, head: state.head.values, classCount: c)
        XCTAssertEqual(labels, s.ints("labels"))
        assertClose(confidences, s.floats("confidences"), tolerance: 1e-4, "pipeline final confidences")
    }

    /// The reference's fixed strong view: odd (i + epoch) → horizontal flip · 0.8 + 0.1, else · 1.1 − 0.05.
    static func strongView(_ weak: [Float], _ i: Int, _ epoch: Int, side: Int) -> [Float] {
        let image = Array(weak[(i * 3 * side * side)..<((i + 1) * 3 * side * side)])
        guard (i + epoch) % 2 == 1 else { return image.map { $0 * 1.1 - 0.05 } }
        var out = image
        for ch in 0..<3 { for y in 0..<side { for x in 0..<side {
            out[(ch * side + y) * side + x] = image[(ch * side + y) * side + (side - 1 - x)] * 0.8 + 0.1
        } } }
        return out
    }
}
