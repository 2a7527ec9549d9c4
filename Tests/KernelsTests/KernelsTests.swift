// KernelsTests: every kernel against its naive Double reference (forward) and against finite
// differences of that reference (backward). Each test prints its max error and fails past its tolerance.
import Foundation
import XCTest
@testable import Kernels

struct Rng {
    var state: UInt64
    mutating func next() -> Double {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return Double(state >> 11) / Double(1 << 53)
    }
    /// uniform in [-scale, scale)
    mutating func floats(_ n: Int, scale: Double = 1) -> [Float] { (0..<n).map { _ in Float((next() * 2 - 1) * scale) } }
}

func maxAbsError(_ a: [Float], _ b: [Double]) -> Double {
    precondition(a.count == b.count)
    return zip(a, b).map { abs(Double($0) - $1) }.max() ?? 0
}
func maxAbs(_ a: [Double]) -> Double { a.map(abs).max() ?? 0 }

/// Central finite differences of L(x) = Σ f(x)·r in Double.
func numericGradient(_ x: [Float], _ r: [Float], _ f: ([Double]) -> [Double]) -> [Double] {
    var xd = x.map(Double.init)
    let rd = r.map(Double.init)
    let h = 1e-6
    return (0..<x.count).map { i in
        let x0 = xd[i]
        xd[i] = x0 + h; let lp = zip(f(xd), rd).reduce(0) { $0 + $1.0 * $1.1 }
        xd[i] = x0 - h; let lm = zip(f(xd), rd).reduce(0) { $0 + $1.0 * $1.1 }
        xd[i] = x0
        return (lp - lm) / (2 * h)
    }
}

func check(_ name: String, _ got: [Float], _ want: [Double], relTol: Double, file: StaticString = #filePath, line: UInt = #line) {
    let err = maxAbsError(got, want), scale = max(maxAbs(want), 1e-6)
    print("\(name): max abs error \(err) (scale \(scale), relative \(err / scale), tolerance \(relTol))")
    XCTAssertLessThanOrEqual(err / scale, relTol, name, file: file, line: line)
}

final class KernelsTests: XCTestCase {
    /// Each test runs with two kernel threads, bound to the test's thread.
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    func testLinear_forwardAndBackward_matchReference() {
        var rng = Rng(state: 1)
        let n = 5, i = 12, o = 7
        let x = rng.floats(n * i), w = rng.floats(o * i), b = rng.floats(o), r = rng.floats(n * o)
        var y = [Float](repeating: 0, count: n * o)
        linearForward(&y, x, w, b, n: n, inFeatures: i, outFeatures: o)
        let d = { (v: [Float]) in v.map(Double.init) }
        check("linear forward", y, referenceLinear(d(x), d(w), d(b), n: n, inFeatures: i, outFeatures: o), relTol: 1e-5)
        var dx = [Float](repeating: 0, count: n * i), dw = [Float](repeating: 0, count: o * i), db = [Float](repeating: 0, count: o)
        linearBackward(dinp: &dx, dweight: &dw, dbias: &db, r, x, w, n: n, inFeatures: i, outFeatures: o)
        check("linear dinp", dx, numericGradient(x, r) { referenceLinear($0, d(w), d(b), n: n, inFeatures: i, outFeatures: o) }, relTol: 1e-5)
        check("linear dweight", dw, numericGradient(w, r) { referenceLinear(d(x), $0, d(b), n: n, inFeatures: i, outFeatures: o) }, relTol: 1e-5)
        check("linear dbias", db, numericGradient(b, r) { referenceLinear(d(x), d(w), $0, n: n, inFeatures: i, outFeatures: o) }, relTol: 1e-5)
    }

    func testLayerNorm_forwardAndBackward_matchReference() {
        var rng = Rng(state: 2)
        let n = 6, c = 20   // c not a multiple of 8: exercises the SIMD tail
        let x = rng.floats(n * c, scale: 3).map { $0 + 5 }, w = rng.floats(c), b = rng.floats(c), r = rng.floats(n * c)
        var y = [Float](repeating: 0, count: n * c), mean = [Float](repeating: 0, count: n), rstd = mean
        layerNormForward(&y, mean: &mean, rstd: &rstd, x, w, b, n: n, c: c, eps: 1e-5)
        let d = { (v: [Float]) in v.map(Double.init) }
        check("layernorm forward", y, referenceLayerNorm(d(x), d(w), d(b), n: n, c: c, eps: 1e-5), relTol: 1e-5)
        var dx = [Float](repeating: 0, count: n * c), dw = [Float](repeating: 0, count: c), db = dw
        layerNormBackward(dinp: &dx, dweight: &dw, dbias: &db, r, x, w, mean: mean, rstd: rstd, n: n, c: c)
        check("layernorm dinp", dx, numericGradient(x, r) { referenceLayerNorm($0, d(w), d(b), n: n, c: c, eps: 1e-5) }, relTol: 1e-4)
        check("layernorm dweight", dw, numericGradient(w, r) { referenceLayerNorm(d(x), $0, d(b), n: n, c: c, eps: 1e-5) }, relTol: 1e-4)
        check("layernorm dbias", db, numericGradient(b, r) { referenceLayerNorm(d(x), d(w), $0, n: n, c: c, eps: 1e-5) }, relTol: 1e-4)
    }

    func testActivations_forwardAndBackward_matchReference_includingExtremeInputs() {
        var rng = Rng(state: 3)
        let x = rng.floats(203, scale: 6) + [0, -0, 30, -30, 100, -100, 1e-6, -1e-6]
        let r = rng.floats(x.count)
        for act in [Activation.gelu, .quickGelu] {
            var y = [Float](repeating: 0, count: x.count)
            activationForward(&y, x, count: x.count, act)
            check("\(act) forward", y, referenceActivation(x.map(Double.init), act), relTol: 1e-6)
            var dx = [Float](repeating: 0, count: x.count)
            activationBackward(dinp: &dx, r, x, count: x.count, act)
            check("\(act) backward", dx, numericGradient(x, r) { referenceActivation($0, act) }, relTol: 1e-5)
        }
    }

    func testBiasActivation_matchesReference_andKeepsThePreActivation() {
        var rng = Rng(state: 9)
        let n = 3, c = 21
        let x = rng.floats(n * c, scale: 4), bias = rng.floats(c)
        for act in [Activation.gelu, .quickGelu] {
            var pre = x, out = [Float](repeating: 0, count: n * c)
            biasActivationForward(&out, &pre, bias, n: n, c: c, act)
            let want = (0..<(n * c)).map { Double(x[$0]) + Double(bias[$0 % c]) }
            check("bias+\(act) pre-activation", pre, want, relTol: 1e-6)
            check("bias+\(act) output", out, referenceActivation(want, act), relTol: 1e-6)
        }
    }

    func testExp8_matchesFoundation_overItsRange() {
        var worst = 0.0
        var x: Float = -87
        while x < 88 {
            let got = exp8(SIMD8(repeating: x))[0]
            worst = max(worst, abs(Double(got) - exp(Double(x))) / exp(Double(x)))
            x += 0.0137
        }
        print("exp8: max relative error \(worst)")
        XCTAssertLessThan(worst, 1e-6)
    }

    func testSoftmax_matchesReference_withLargeLogits() {
        var rng = Rng(state: 4)
        let n = 4, c = 19
        var x = rng.floats(n * c, scale: 5)
        x[0] = 1000; x[c] = -1000
        var y = [Float](repeating: 0, count: n * c)
        softmaxForward(&y, x, n: n, c: c)
        check("softmax", y, referenceSoftmax(x.map(Double.init), n: n, c: c), relTol: 1e-6)
    }

    func testAttention_forwardAndBackward_matchReference_withAndWithoutCausalMask() {
        var rng = Rng(state: 5)
        let b = 2, t = 9, d = 12, heads = 3
        let qkv = rng.floats(b * t * 3 * d, scale: 2), r = rng.floats(b * t * d)
        for causal in [false, true] {
            var out = [Float](repeating: 0, count: b * t * d), probs = [Float](repeating: 0, count: b * heads * t * t)
            attentionForward(&out, probs: &probs, qkv, b: b, t: t, d: d, heads: heads, causal: causal)
            check("attention forward causal=\(causal)", out,
                  referenceAttention(qkv.map(Double.init), b: b, t: t, d: d, heads: heads, causal: causal), relTol: 1e-5)
            var dqkv = [Float](repeating: 0, count: qkv.count)
            attentionBackward(dqkv: &dqkv, r, qkv, probs: probs, b: b, t: t, d: d, heads: heads)
            check("attention backward causal=\(causal)", dqkv, numericGradient(qkv, r) {
                referenceAttention($0, b: b, t: t, d: d, heads: heads, causal: causal)
            }, relTol: 1e-4)
        }
    }

    func testAttention_singleQueryRow_equalsThatRowOfTheFullAttention() {
        var rng = Rng(state: 10)
        let b = 2, t = 7, d = 8, heads = 2
        let qkv = rng.floats(b * t * 3 * d, scale: 2), r = rng.floats(b * d)
        for (causal, row) in [(false, 0), (true, t - 1), (true, 3)] {
            var full = [Float](repeating: 0, count: b * t * d), probs = [Float](repeating: 0, count: b * heads * t * t)
            attentionForward(&full, probs: &probs, qkv, b: b, t: t, d: d, heads: heads, causal: causal)
            var one = [Float](repeating: 0, count: b * d), oneProbs = [Float](repeating: 0, count: b * heads * t)
            attentionForward(&one, probs: &oneProbs, qkv, b: b, t: t, d: d, heads: heads, causal: causal, onlyRow: row)
            var wantOut: [Double] = []
            for bi in 0..<b { for j in 0..<d { wantOut.append(Double(full[(bi * t + row) * d + j])) } }
            check("attention row \(row) causal=\(causal) forward", one, wantOut, relTol: 1e-6)
            // dout only on that row: both backwards agree
            var dfull = [Float](repeating: 0, count: b * t * d)
            for bi in 0..<b { for j in 0..<d { dfull[(bi * t + row) * d + j] = r[bi * d + j] } }
            var gFull = [Float](repeating: 0, count: qkv.count), gOne = gFull
            attentionBackward(dqkv: &gFull, dfull, qkv, probs: probs, b: b, t: t, d: d, heads: heads)
            attentionBackward(dqkv: &gOne, r, qkv, probs: oneProbs, b: b, t: t, d: d, heads: heads, onlyRow: row)
            check("attention row \(row) causal=\(causal) backward", gOne, gFull.map(Double.init), relTol: 1e-6)
        }
    }

    func testIm2colPatches_timesWeight_equalsConvolution() {
        var rng = Rng(state: 6)
        let b = 2, c = 3, h = 8, w = 12, p = 4, dOut = 5
        let px = rng.floats(b * c * h * w), wt = rng.floats(dOut * c * p * p), bias = rng.floats(dOut)
        let gh = h / p, gw = w / p
        var cols = [Float](repeating: 0, count: b * gh * gw * c * p * p)
        im2colPatches(&cols, px, b: b, c: c, h: h, w: w, patch: p)
        var y = [Float](repeating: 0, count: b * gh * gw * dOut)
        linearForward(&y, cols, wt, bias, n: b * gh * gw, inFeatures: c * p * p, outFeatures: dOut)
        var want = [Double](repeating: 0, count: y.count)
        for bi in 0..<b { for gy in 0..<gh { for gx in 0..<gw { for o in 0..<dOut {
            var s = Double(bias[o])
            for ch in 0..<c { for ky in 0..<p { for kx in 0..<p {
                s += Double(px[((bi * c + ch) * h + gy * p + ky) * w + gx * p + kx]) * Double(wt[((o * c + ch) * p + ky) * p + kx])
            } } }
            want[((bi * gh + gy) * gw + gx) * dOut + o] = s
        } } } }
        check("patch embedding", y, want, relTol: 1e-5)
    }

    func testCrossEntropy_lossAndGradient_matchReference() {
        var rng = Rng(state: 7)
        let n = 3, c = 5, eps: Float = 0.1
        let logits = rng.floats(n * c, scale: 4), labels = [0, 4, 2]
        func loss(_ z: [Double]) -> Double {
            var l = 0.0
            for r in 0..<n {
                let p = referenceSoftmax(Array(z[(r * c)..<((r + 1) * c)]), n: 1, c: c)
                for j in 0..<c { l -= ((j == labels[r] ? 1 - Double(eps) : 0) + Double(eps) / Double(c)) * log(p[j]) }
            }
            return l / Double(n)
        }
        var g = [Float](repeating: 0, count: n * c)
        let l = crossEntropyForwardBackward(dlogits: &g, logits, labels: labels, n: n, c: c, smoothing: eps)
        let want = loss(logits.map(Double.init))
        print("cross-entropy loss: \(l) vs \(want)")
        XCTAssertEqual(Double(l), want, accuracy: 1e-5)
        check("cross-entropy gradient", g, numericGradient(logits, [1]) { [loss($0)] }, relTol: 1e-4)
    }

    func testL2Normalize_backward_matchesFiniteDifferences() {
        var rng = Rng(state: 8)
        let n = 3, c = 7
        let x = rng.floats(n * c), r = rng.floats(n * c)
        func f(_ v: [Double]) -> [Double] {
            var y = v
            for i in 0..<n { let s = (0..<c).reduce(0.0) { $0 + v[i * c + $1] * v[i * c + $1] }.squareRoot(); for j in 0..<c { y[i * c + j] = v[i * c + j] / s } }
            return y
        }
        var y = [Float](repeating: 0, count: n * c), norms = [Float](repeating: 0, count: n), dx = y
        l2NormalizeForward(&y, norms: &norms, x, n: n, c: c)
        check("l2 normalize forward", y, f(x.map(Double.init)), relTol: 1e-6)
        l2NormalizeBackward(dinp: &dx, r, y, norms: norms, n: n, c: c)
        check("l2 normalize backward", dx, numericGradient(x, r, f), relTol: 1e-4)
    }
}
