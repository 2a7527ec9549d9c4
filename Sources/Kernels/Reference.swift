import Foundation

// Naive reference kernels in Double: the oracles of the kernel tests (forward values and,
// through finite differences, gradients). Written for clarity, never for speed.

/// (N,OUT) = x (N,IN) · wᵀ (OUT,IN) + b (OUT)
public func referenceLinear(_ x: [Double], _ w: [Double], _ b: [Double]?, n: Int, inFeatures: Int, outFeatures: Int) -> [Double] {
    var y = [Double](repeating: 0, count: n * outFeatures)
    for r in 0..<n { for o in 0..<outFeatures {
        var s = b?[o] ?? 0
        for i in 0..<inFeatures { s += x[r * inFeatures + i] * w[o * inFeatures + i] }
        y[r * outFeatures + o] = s
    } }
    return y
}

public func referenceLayerNorm(_ x: [Double], _ w: [Double], _ b: [Double], n: Int, c: Int, eps: Double) -> [Double] {
    var y = x
    for r in 0..<n {
        let row = x[(r * c)..<((r + 1) * c)]
        let m = row.reduce(0, +) / Double(c)
        let v = row.reduce(0) { $0 + ($1 - m) * ($1 - m) } / Double(c)
        for i in 0..<c { y[r * c + i] = (x[r * c + i] - m) / (v + eps).squareRoot() * w[i] + b[i] }
    }
    return y
}

public func referenceActivation(_ x: [Double], _ act: Activation) -> [Double] {
    x.map { act == .gelu ? 0.5 * $0 * (1 + erf($0 / 2.0.squareRoot())) : $0 / (1 + exp(-1.702 * $0)) }
}

public func referenceSoftmax(_ x: [Double], n: Int, c: Int) -> [Double] {
    var y = x
    for r in 0..<n {
        let m = x[(r * c)..<((r + 1) * c)].max()!
        let e = (0..<c).map { exp(x[r * c + $0] - m) }
        let s = e.reduce(0, +)
        for j in 0..<c { y[r * c + j] = e[j] / s }
    }
    return y
}

/// out (B,T,D) from qkv (B,T,3D), as attentionForward.
public func referenceAttention(_ qkv: [Double], b: Int, t: Int, d: Int, heads: Int, causal: Bool) -> [Double] {
    let hd = d / heads
    var out = [Double](repeating: 0, count: b * t * d)
    for bi in 0..<b { for h in 0..<heads { for i in 0..<t {
        let valid = causal ? i + 1 : t
        var s = (0..<valid).map { j -> Double in
            var dot = 0.0
            for e in 0..<hd { dot += qkv[(bi * t + i) * 3 * d + h * hd + e] * qkv[(bi * t + j) * 3 * d + d + h * hd + e] }
            return dot / Double(hd).squareRoot()
        }
        s = referenceSoftmax(s, n: 1, c: valid)
        for e in 0..<hd {
            var acc = 0.0
            for j in 0..<valid { acc += s[j] * qkv[(bi * t + j) * 3 * d + 2 * d + h * hd + e] }
            out[(bi * t + i) * d + h * hd + e] = acc
        }
    } } }
    return out
}

/// (N,OUT) = residual (N,OUT) + x (N,IN) · wᵀ (OUT,IN) + b (OUT), as linearForwardAdding.
public func referenceLinearAdding(_ residual: [Double], _ x: [Double], _ w: [Double], _ b: [Double]?,
                                  n: Int, inFeatures: Int, outFeatures: Int) -> [Double] {
    zip(residual, referenceLinear(x, w, b, n: n, inFeatures: inFeatures, outFeatures: outFeatures)).map { $0 + $1 }
}

/// (N,C) = residual + x · scale per channel, as scaledResidualForward.
public func referenceScaledResidual(_ residual: [Double], _ x: [Double], _ scale: [Double], n: Int, c: Int) -> [Double] {
    (0..<(n * c)).map { residual[$0] + x[$0] * scale[$0 % c] }
}
