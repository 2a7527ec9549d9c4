import Foundation

/// Label-smoothing cross-entropy, mean over the rows (PyTorch `cross_entropy(label_smoothing: ε)`, equal
/// to the reference's `LabelSmoothingCrossEntropy`: ε·mean_k(−log p_k) + (1−ε)·(−log p_y)).
/// logits is (B, C), targets (B). Writes dLogits (B, C) = (softmax − ((1−ε)·onehot + ε/C)) · scale, with
/// `scale` = 1/B for a plain mean, or 1/(logical batch) when micro-batches accumulate. Returns the
/// summed (not averaged) loss of the rows, so callers can average over any batch they like.
@discardableResult
public func labelSmoothingCrossEntropy(logits: [Float], targets: [Int], classCount c: Int, smoothing epsilon: Float,
                                       gradientScale scale: Float, dLogits: inout [Float]) -> Double {
    let b = targets.count
    precondition(logits.count == b * c && dLogits.count == b * c)
    var total = 0.0
    var row = [Float](repeating: 0, count: c)
    for i in 0..<b {
        let y = targets[i]
        precondition(y >= 0 && y < c, "target \(y) outside 0..<\(c)")
        let base = i * c
        var m = -Float.infinity
        for k in 0..<c { m = max(m, logits[base + k]) }
        var sum: Float = 0
        for k in 0..<c { row[k] = exp(logits[base + k] - m); sum += row[k] }
        let logSum = log(sum) + m
        var meanNegLog = 0.0
        for k in 0..<c { meanNegLog += Double(logSum - logits[base + k]) }
        meanNegLog /= Double(c)
        let nll = Double(logSum - logits[base + y])
        total += Double(epsilon) * meanNegLog + Double(1 - epsilon) * nll
        for k in 0..<c {
            let target = (k == y ? 1 - epsilon : 0) + epsilon / Float(c)
            dLogits[base + k] = (row[k] / sum - target) * scale
        }
    }
    return total
}
