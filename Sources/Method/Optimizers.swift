import Foundation

/// Adam / AdamW with PyTorch's semantics (`torch.optim.Adam`/`AdamW`, single-tensor path): decoupled
/// weight decay `p *= 1 - lr·wd` first (AdamW only), then
/// m = lerp(m, g, 1-β1); v = β2·v + (1-β2)·g²; p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps).
public struct AdamHyperparameters: Equatable, Sendable {
    public var learningRate: Double
    public var beta1 = 0.9
    public var beta2 = 0.999
    public var epsilon = 1e-8
    /// Decoupled (AdamW) weight decay; 0 = plain Adam.
    public var weightDecay = 0.0

    public init(learningRate: Double, beta1: Double = 0.9, beta2: Double = 0.999, epsilon: Double = 1e-8, weightDecay: Double = 0) {
        self.learningRate = learningRate
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.weightDecay = weightDecay
    }
}

/// One parameter tensor's Adam moments.
public struct AdamMoments: Equatable, Sendable {
    public var m: [Float]
    public var v: [Float]
    public init(count: Int) { m = [Float](repeating: 0, count: count); v = m }
    public init(m: [Float], v: [Float]) { precondition(m.count == v.count); self.m = m; self.v = v }
}

/// One Adam(W) update of `parameter` (n) from `gradient` (n); `step` counts from 1.
public func adamStep(parameter: inout [Float], gradient: [Float], moments: inout AdamMoments, step: Int,
                     _ h: AdamHyperparameters) {
    precondition(parameter.count == gradient.count && gradient.count == moments.m.count && step >= 1)
    let lr = h.learningRate
    let decay = Float(1 - lr * h.weightDecay)
    let w1 = Float(1 - h.beta1), b2 = Float(h.beta2), w2 = Float(1 - h.beta2)
    let stepSize = Float(lr / (1 - pow(h.beta1, Double(step))))
    let correction2 = Float((1 - pow(h.beta2, Double(step))).squareRoot())
    let eps = Float(h.epsilon)
    let useDecay = h.weightDecay != 0
    parameter.withUnsafeMutableBufferPointer { p in
        gradient.withUnsafeBufferPointer { g in
            moments.m.withUnsafeMutableBufferPointer { m in
                moments.v.withUnsafeMutableBufferPointer { v in
                    for i in 0..<p.count {
                        if useDecay { p[i] *= decay }
                        m[i] += w1 * (g[i] - m[i])
                        v[i] = v[i] * b2 + w2 * g[i] * g[i]
                        let denom = v[i].squareRoot() / correction2 + eps
                        p[i] -= stepSize * (m[i] / denom)
                    }
                }
            }
        }
    }
}
