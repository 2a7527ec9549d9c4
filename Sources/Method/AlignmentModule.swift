import Foundation

// Stage 2b: the alignment module — an MLP on DINO CLS features trained on the pseudo-labels
// (reference `AdapterMLP` + `train_taal`: Adam lr 1e-3, cross-entropy, batch 32, shuffled, 50 epochs).

/// fc1: Linear(D → H), ReLU, fc2: Linear(H → C). Field names follow the reference's
/// `taal_h_module.mlp.0` / `mlp.2` (weights in PyTorch's (out, in) layout).
public struct AlignmentModule: Equatable, Sendable {
    public let inputSize: Int, hiddenSize: Int, classCount: Int
    public var fc1Weight: [Float] // (H, D)  mlp.0.weight
    public var fc1Bias: [Float]   // (H)     mlp.0.bias
    public var fc2Weight: [Float] // (C, H)  mlp.2.weight
    public var fc2Bias: [Float]   // (C)     mlp.2.bias

    public init(inputSize d: Int, hiddenSize h: Int, classCount c: Int,
                fc1Weight: [Float], fc1Bias: [Float], fc2Weight: [Float], fc2Bias: [Float]) {
        precondition(fc1Weight.count == h * d && fc1Bias.count == h && fc2Weight.count == c * h && fc2Bias.count == c)
        inputSize = d; hiddenSize = h; classCount = c
        self.fc1Weight = fc1Weight; self.fc1Bias = fc1Bias; self.fc2Weight = fc2Weight; self.fc2Bias = fc2Bias
    }

    /// PyTorch's default `nn.Linear` initialisation (kaiming-uniform a=√5 for weights, which is
    /// U(±1/√fan_in), and U(±1/√fan_in) for biases), drawn from `random`.
    public init(inputSize d: Int, hiddenSize h: Int, classCount c: Int, random: inout SeededRandom) {
        func uniform(_ n: Int, _ bound: Float) -> [Float] { (0..<n).map { _ in random.uniform(-bound, bound) } }
        let b1 = 1 / Float(d).squareRoot(), b2 = 1 / Float(h).squareRoot()
        let w1 = uniform(h * d, b1), bias1 = uniform(h, b1), w2 = uniform(c * h, b2), bias2 = uniform(c, b2)
        self.init(inputSize: d, hiddenSize: h, classCount: c, fc1Weight: w1, fc1Bias: bias1, fc2Weight: w2, fc2Bias: bias2)
    }

    /// logits (B, C) of features (B, D); also returns the post-ReLU hidden activations (B, H).
    func forward(_ x: [Float], batch b: Int) -> (logits: [Float], hidden: [Float]) {
        precondition(x.count == b * inputSize)
        // hidden = relu(x · fc1ᵀ + fc1.bias); logits = hidden · fc2ᵀ + fc2.bias
        var hidden = linear(x, fc1Weight, fc1Bias, n: b, inFeatures: inputSize, outFeatures: hiddenSize)
        for i in hidden.indices where hidden[i] < 0 { hidden[i] = 0 }
        let logits = linear(hidden, fc2Weight, fc2Bias, n: b, inFeatures: hiddenSize, outFeatures: classCount)
        return (logits, hidden)
    }

    /// Class probabilities (B, C) of DINO features (B, D), in chunks.
    public func probabilities(features: [Float]) -> [Float] {
        precondition(features.count % inputSize == 0)
        let n = features.count / inputSize
        var out = [Float]()
        out.reserveCapacity(n * classCount)
        var start = 0
        while start < n {
            let b = min(256, n - start)
            var logits = forward(Array(features[(start * inputSize)..<((start + b) * inputSize)]), batch: b).logits
            for i in 0..<b {
                var row = Array(logits[(i * classCount)..<((i + 1) * classCount)])
                softmaxRow(&row)
                logits.replaceSubrange((i * classCount)..<((i + 1) * classCount), with: row)
            }
            out += logits
            start += b
        }
        return out
    }

    /// Teacher labels: argmax of the module on DINO features (N, D) (reference `forward_backward`).
    public func labels(features: [Float]) -> [Int] {
        argmaxRows(probabilities(features: features), columns: classCount).labels
    }
}

/// Trains the module in place on `features` (N, D) with `labels` (N): for each epoch, the samples in
/// `order(epoch)` (default: a seeded shuffle) in batches of `batchSize` (last one smaller), mean
/// cross-entropy, Adam. `onEpoch(epoch, meanLoss)` is called after each epoch and may throw to stop.
public func trainAlignmentModule(_ module: inout AlignmentModule, features: [Float], labels: [Int],
                                 epochs: Int, batchSize: Int, learningRate: Double, seed: UInt64,
                                 order: ((Int) -> [Int])? = nil,
                                 onEpoch: (Int, Double) throws -> Void = { _, _ in }) throws {
    let d = module.inputSize, h = module.hiddenSize, c = module.classCount
    let n = labels.count
    precondition(features.count == n * d && batchSize > 0)
    guard n > 0 else { throw MethodError(.badInput, "alignment module", "no pseudo-labelled images to train on") }
    let adam = AdamHyperparameters(learningRate: learningRate)
    var moments = [AdamMoments(count: h * d), AdamMoments(count: h), AdamMoments(count: c * h), AdamMoments(count: c)]
    var step = 0
    for epoch in 0..<epochs {
        var random = SeededRandom(seed: seed, stream: "alignment shuffle", index: epoch)
        let permutation = order?(epoch) ?? random.permutation(n)
        precondition(permutation.count == n)
        var epochLoss = 0.0
        var start = 0
        while start < n {
            let batch = Array(permutation[start..<min(n, start + batchSize)])
            let b = batch.count
            var x = [Float](repeating: 0, count: b * d)
            for (row, i) in batch.enumerated() {
                x.replaceSubrange((row * d)..<((row + 1) * d), with: features[(i * d)..<((i + 1) * d)])
            }
            let (logits, hidden) = module.forward(x, batch: b)
            var dLogits = [Float](repeating: 0, count: b * c)
            epochLoss += smoothedCrossEntropy(logits, targets: batch.map { labels[$0] }, classCount: c, smoothing: 0,
                                              logicalBatch: b, dLogits: &dLogits)
            // logits = hidden · fc2ᵀ + fc2.bias
            var dW2 = [Float](repeating: 0, count: c * h), dB2 = [Float](repeating: 0, count: c)
            var dHidden = [Float](repeating: 0, count: b * h)
            dHidden.withUnsafeMutableBufferPointer { dh in
                dB2.withUnsafeMutableBufferPointer { db in
                    linearGradients(dLogits, hidden, module.fc2Weight, n: b, inFeatures: h, outFeatures: c,
                                    dInp: dh.baseAddress!, dWeight: &dW2, dBias: db.baseAddress!)
                }
            }
            // hidden = relu(x · fc1ᵀ + fc1.bias)
            for i in dHidden.indices where hidden[i] <= 0 { dHidden[i] = 0 }
            var dW1 = [Float](repeating: 0, count: h * d), dB1 = [Float](repeating: 0, count: h)
            dB1.withUnsafeMutableBufferPointer { db in
                linearGradients(dHidden, x, module.fc1Weight, n: b, inFeatures: d, outFeatures: h,
                                dInp: nil, dWeight: &dW1, dBias: db.baseAddress!)
            }
            step += 1
            adamStep(parameter: &module.fc1Weight, gradient: dW1, moments: &moments[0], step: step, adam)
            adamStep(parameter: &module.fc1Bias, gradient: dB1, moments: &moments[1], step: step, adam)
            adamStep(parameter: &module.fc2Weight, gradient: dW2, moments: &moments[2], step: step, adam)
            adamStep(parameter: &module.fc2Bias, gradient: dB2, moments: &moments[3], step: step, adam)
            start += b
        }
        try onEpoch(epoch, epochLoss / Double(n))
    }
}
