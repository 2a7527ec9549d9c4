import Foundation

// Stage 2 as one call for the daemon: zero-shot labels, pseudo-labels, the alignment module and the
// teacher's labels of every image, from features the caller computed (and cached).

public struct PseudoLabelStage: Sendable {
    /// (N, C) zero-shot probabilities.
    public var probabilities: [Float]
    /// Zero-shot label and its probability for every image (reported beside the final label).
    public var zeroShotLabels: [Int]
    public var zeroShotConfidences: [Float]
    public var k: Int
    public var pseudoLabels: PseudoLabels
    /// The trained alignment module.
    public var alignmentModule: AlignmentModule
    /// Mean cross-entropy of each alignment epoch.
    public var alignmentLosses: [Double]
    /// The teacher's label of every image: argmax of the alignment module on its DINO features.
    public var teacherLabels: [Int]
}

/// Runs stage 2 on cached features of the weak views: clipFeatures (N, E) (`get_image_features`),
/// classifier (C, E) from stage 1, logitScale = exp(CLIP's logit_scale), dinoFeatures (N, Dd) (CLS after
/// the final layernorm). The alignment module starts from PyTorch's default init drawn from the job seed
/// and trains on the pseudo-labelled images' DINO features. `onAlignmentEpoch(epoch, loss)` may throw
/// (e.g. `.cancelled`) to stop.
public func runPseudoLabelStage(clipFeatures: [Float], classifier: [Float], featureSize e: Int, logitScale: Float,
                                dinoFeatures: [Float], dinoSize dd: Int, parameters: NolaParameters,
                                onAlignmentEpoch: (Int, Double) throws -> Void = { _, _ in }) throws -> PseudoLabelStage {
    precondition(e > 0 && dd > 0 && classifier.count % e == 0)
    let c = classifier.count / e, n = clipFeatures.count / e
    guard n > 0 else { throw MethodError(.badInput, "collection", "no readable images") }
    precondition(clipFeatures.count == n * e && dinoFeatures.count == n * dd, "features must cover the same N images")
    let probabilities = try zeroShotProbabilities(imageFeatures: clipFeatures, classifier: classifier, dimension: e, logitScale: logitScale)
    let (zsLabels, zsConfidences) = argmaxRows(probabilities, columns: c)
    let k = parameters.k(imageCount: n, classCount: c)
    let pseudo = selectPseudoLabels(probabilities: probabilities, classCount: c, k: k)
    var random = SeededRandom(seed: parameters.seed, stream: "alignment init")
    var module = AlignmentModule(inputSize: dd, hiddenSize: parameters.alignmentHiddenSize, classCount: c, random: &random)
    var x = [Float]()
    x.reserveCapacity(pseudo.indices.count * dd)
    for i in pseudo.indices { x += dinoFeatures[(i * dd)..<((i + 1) * dd)] }
    var losses: [Double] = []
    try trainAlignmentModule(&module, features: x, labels: pseudo.labels, epochs: parameters.alignmentEpochs,
                             batchSize: parameters.alignmentBatchSize, learningRate: parameters.alignmentLearningRate,
                             seed: parameters.seed, onEpoch: { epoch, loss in losses.append(loss); try onAlignmentEpoch(epoch, loss) })
    return PseudoLabelStage(probabilities: probabilities, zeroShotLabels: zsLabels, zeroShotConfidences: zsConfidences, k: k,
                            pseudoLabels: pseudo, alignmentModule: module, alignmentLosses: losses,
                            teacherLabels: module.labels(features: dinoFeatures))
}
