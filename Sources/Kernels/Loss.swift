import Foundation

/// Cross-entropy with label smoothing ε, averaged over the batch; returns the loss and writes
/// dlogits (N,C) = (softmax(logits) − target) / N, target = (1−ε)·onehot(label) + ε/C.
/// logits is (N,C), labels (N) in 0..<C.
public func crossEntropyForwardBackward(dlogits: UnsafeMutablePointer<Float>, _ logits: UnsafePointer<Float>,
                                        labels: [Int], n: Int, c: Int, smoothing: Float = 0) -> Float {
    profiled(.loss) {
        precondition(labels.count == n)
        var loss: Float = 0
        softmaxForward(dlogits, logits, n: n, c: c)
        for r in 0..<n {
            precondition(labels[r] >= 0 && labels[r] < c, "label out of range")
            let row = logits + r * c
            var mx = -Float.infinity
            for j in 0..<c { mx = max(mx, row[j]) }
            var s: Float = 0
            for j in 0..<c { s += Foundation.exp(row[j] - mx) }
            let lse = mx + Foundation.log(s)
            let g = dlogits + r * c
            for j in 0..<c {
                let target = (j == labels[r] ? 1 - smoothing : 0) + smoothing / Float(c)
                loss -= target * (row[j] - lse)
                g[j] = (g[j] - target) / Float(n)
            }
        }
        return loss / Float(n)
    }
}
