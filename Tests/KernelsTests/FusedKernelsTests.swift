// The fused kernels and the overwrite (accumulate: false) modes of the backward kernels, each against its
// naive Double reference or against the unfused kernels it replaces.
import Foundation
import XCTest
@testable import Kernels

final class FusedKernelsTests: XCTestCase {
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    let d = { (v: [Float]) in v.map(Double.init) }

    func testLinearForwardAdding_equalsResidualPlusLinear_withAndWithoutBias_inPlace() {
        var rng = Rng(state: 21)
        let n = 7, i = 13, o = 19   // o not a multiple of 8: the bias pass's tail
        let x = rng.floats(n * i), w = rng.floats(o * i), b = rng.floats(o), res = rng.floats(n * o, scale: 3)
        for bias in [b, nil] {
            var out = res   // out aliases the residual, as the encoder layers call it
            out.withUnsafeMutableBufferPointer { p in
                linearForwardAdding(p.baseAddress!, residual: p.baseAddress!, x, w, bias, n: n, inFeatures: i, outFeatures: o)
            }
            check("linear adding, bias \(bias != nil), in place", out,
                  referenceLinearAdding(d(res), d(x), d(w), bias.map(d), n: n, inFeatures: i, outFeatures: o), relTol: 1e-6)
            var apart = [Float](repeating: .nan, count: n * o)
            linearForwardAdding(&apart, residual: res, x, w, bias, n: n, inFeatures: i, outFeatures: o)
            XCTAssertEqual(apart, out, "out apart from the residual: the same bits")
        }
    }

    func testScaledResidual_forwardAndBackward_matchReference() {
        var rng = Rng(state: 22)
        let n = 5, c = 21
        let res = rng.floats(n * c), x = rng.floats(n * c, scale: 2), scale = rng.floats(c), r = rng.floats(n * c)
        var out = [Float](repeating: 0, count: n * c)
        scaledResidualForward(&out, res, x, scale, n: n, c: c)
        check("scaled residual forward", out, referenceScaledResidual(d(res), d(x), d(scale), n: n, c: c), relTol: 1e-6)
        var dx = [Float](repeating: 0, count: n * c)
        channelScaleBackward(dinp: &dx, r, scale, n: n, c: c)
        check("scaled residual dinp", dx, numericGradient(x, r) { referenceScaledResidual(self.d(res), $0, self.d(scale), n: n, c: c) }, relTol: 1e-5)
        check("scaled residual dresidual", r, numericGradient(res, r) { referenceScaledResidual($0, self.d(x), self.d(scale), n: n, c: c) }, relTol: 1e-5)
    }

    /// Rows wider than one 32-column group, with a tail: both paths of the weight gradients.
    func testLayerNormBackward_wideRows_matchReference() {
        var rng = Rng(state: 23)
        let n = 6, c = 70
        let x = rng.floats(n * c, scale: 3).map { $0 + 2 }, w = rng.floats(c), b = rng.floats(c), r = rng.floats(n * c)
        var y = [Float](repeating: 0, count: n * c), mean = [Float](repeating: 0, count: n), rstd = mean
        layerNormForward(&y, mean: &mean, rstd: &rstd, x, w, b, n: n, c: c, eps: 1e-5)
        var dx = [Float](repeating: 0, count: n * c), dw = rng.floats(c), db = rng.floats(c)
        let dw0 = dw, db0 = db   // gradients accumulate onto what is there
        layerNormBackward(dinp: &dx, dweight: &dw, dbias: &db, r, x, w, mean: mean, rstd: rstd, n: n, c: c)
        check("layernorm c=70 dinp", dx, numericGradient(x, r) { referenceLayerNorm($0, self.d(w), self.d(b), n: n, c: c, eps: 1e-5) }, relTol: 1e-4)
        let gw = numericGradient(w, r) { referenceLayerNorm(self.d(x), $0, self.d(b), n: n, c: c, eps: 1e-5) }
        let gb = numericGradient(b, r) { referenceLayerNorm(self.d(x), self.d(w), $0, n: n, c: c, eps: 1e-5) }
        check("layernorm c=70 dweight", dw, zip(dw0, gw).map { Double($0) + $1 }, relTol: 1e-4)
        check("layernorm c=70 dbias", db, zip(db0, gb).map { Double($0) + $1 }, relTol: 1e-4)
    }

    /// The weight gradients are summed in fixed blocks of rows split over the threads: the same bits with 1, 2 or 4 threads.
    func testLayerNormBackward_sameBitsWithOneTwoAndFourThreads() {
        var rng = Rng(state: 24)
        let n = 4100, c = 100
        let x = rng.floats(n * c), w = rng.floats(c), r = rng.floats(n * c)
        var y = [Float](repeating: 0, count: n * c), mean = [Float](repeating: 0, count: n), rstd = mean
        layerNormForward(&y, mean: &mean, rstd: &rstd, x, w, w, n: n, c: c, eps: 1e-5)
        func run(_ threads: Int) -> [Float] {
            var dx = [Float](repeating: 0, count: n * c), dw = [Float](repeating: 0, count: c), db = dw
            withThreads(threads) {
                layerNormBackward(dinp: &dx, dweight: &dw, dbias: &db, r, x, w, mean: mean, rstd: rstd, n: n, c: c)
            }
            return dx + dw + db
        }
        let one = run(1)
        XCTAssertEqual(run(2), one)
        XCTAssertEqual(run(4), one)
    }

    /// accumulate: false writes what accumulating into zeros gives, whatever the buffer held.
    func testBackwardOverwriteModes_equalAccumulatingIntoZeros() {
        var rng = Rng(state: 25)
        let n = 9, i = 16, o = 24
        let dout = rng.floats(n * o), x = rng.floats(n * i), w = rng.floats(o * i)
        var acc = [Float](repeating: 0, count: n * i), over = [Float](repeating: .nan, count: n * i)
        linearBackward(dinp: &acc, dweight: nil, dbias: nil, dout, x, w, n: n, inFeatures: i, outFeatures: o)
        linearBackward(dinp: &over, dweight: nil, dbias: nil, dout, x, w, n: n, inFeatures: i, outFeatures: o, accumulate: false)
        XCTAssertEqual(over, acc, "linear dinp")

        let pre = rng.floats(203, scale: 5), g = rng.floats(203)
        for act in [Activation.gelu, .quickGelu] {
            var a = [Float](repeating: 0, count: 203), b = [Float](repeating: .nan, count: 203)
            activationBackward(dinp: &a, g, pre, count: 203, act)
            activationBackward(dinp: &b, g, pre, count: 203, act, accumulate: false)
            XCTAssertEqual(b, a, "\(act) backward")
        }

        let bb = 2, t = 9, dd = 12, heads = 3
        let qkv = rng.floats(bb * t * 3 * dd, scale: 2), r = rng.floats(bb * t * dd)
        var out = [Float](repeating: 0, count: bb * t * dd), probs = [Float](repeating: 0, count: bb * heads * t * t)
        attentionForward(&out, probs: &probs, qkv, b: bb, t: t, d: dd, heads: heads, causal: false)
        var ga = [Float](repeating: 0, count: qkv.count), gb = [Float](repeating: .nan, count: qkv.count)
        attentionBackward(dqkv: &ga, r, qkv, probs: probs, b: bb, t: t, d: dd, heads: heads)
        attentionBackward(dqkv: &gb, r, qkv, probs: probs, b: bb, t: t, d: dd, heads: heads, accumulate: false)
        XCTAssertEqual(gb, ga, "attention dqkv")
    }
}
