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

/// dqkv (B,T,3D), the gradient of Σ out·dout for out = referenceAttention(qkv): the backward written out
/// per (image, head, query row) in Double, as attentionBackward (full rows).
public func referenceAttentionBackward(_ qkv: [Double], dout: [Double], b: Int, t: Int, d: Int, heads: Int,
                                       causal: Bool) -> [Double] {
    let hd = d / heads, scale = 1 / Double(hd).squareRoot()
    var g = [Double](repeating: 0, count: qkv.count)
    func at(_ bi: Int, _ i: Int, _ part: Int, _ h: Int, _ e: Int) -> Int { (bi * t + i) * 3 * d + part * d + h * hd + e }
    for bi in 0..<b { for h in 0..<heads { for i in 0..<t {
        let valid = causal ? i + 1 : t
        let s = (0..<valid).map { j -> Double in
            (0..<hd).reduce(0.0) { $0 + qkv[at(bi, i, 0, h, $1)] * qkv[at(bi, j, 1, h, $1)] } * scale
        }
        let p = referenceSoftmax(s, n: 1, c: valid)
        let dO = (0..<hd).map { dout[(bi * t + i) * d + h * hd + $0] }
        let dp = (0..<valid).map { j in (0..<hd).reduce(0.0) { $0 + dO[$1] * qkv[at(bi, j, 2, h, $1)] } }
        let dot = zip(p, dp).reduce(0.0) { $0 + $1.0 * $1.1 }
        for j in 0..<valid {
            let ds = p[j] * (dp[j] - dot)
            for e in 0..<hd {
                g[at(bi, j, 2, h, e)] += p[j] * dO[e]
                g[at(bi, i, 0, h, e)] += scale * ds * qkv[at(bi, j, 1, h, e)]
                g[at(bi, j, 1, h, e)] += scale * ds * qkv[at(bi, i, 0, h, e)]
            }
        }
    } } }
    return g
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
