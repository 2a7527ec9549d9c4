// The convolution kernels (channels-last) against the naive grouped convolution `referenceConv2d` (forward)
// and finite differences of it (backward). Each check prints its max error.
import Foundation
import XCTest
@testable import Kernels

final class ConvolutionTests: XCTestCase {
    override func invokeTest() { withThreads(2) { super.invokeTest() } }
    private let d = { (v: [Float]) in v.map(Double.init) }

    func testDenseConv_strideAndPadding_matchesReference() {
        var rng = Rng(state: 11)
        // the MCi stem's first conv (3 → C, 3×3, stride 2, padding 1) on an odd size, and a 1×1 stride-2 conv
        for (h, w, c, oc, k, s, p) in [(9, 7, 3, 10, 3, 2, 1), (6, 5, 4, 3, 1, 2, 0), (5, 5, 2, 9, 7, 1, 3)] {
            let b = 2
            let x = rng.floats(b * h * w * c), wt = rng.floats(oc * c * k * k), bias = rng.floats(oc)
            let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
            var y = [Float](repeating: 0, count: b * oh * ow * oc)
            conv2dForward(&y, x, wt, bias, b: b, h: h, w: w, c: c, outChannels: oc, kernel: k, stride: s, padding: p)
            check("conv \(k)×\(k) stride \(s) on \(h)×\(w)", y, referenceConv2d(d(x), d(wt), d(bias), b: b, h: h, w: w, c: c,
                                                                              outChannels: oc, groups: 1, kernel: k, stride: s, padding: p), relTol: 1e-5)
        }
    }

    /// A (C,1,k,k) PyTorch depthwise weight as the kernel's (k,k,C).
    private func tapsMajor(_ wt: [Float], c: Int, k: Int) -> [Float] {
        var t = [Float](repeating: 0, count: wt.count)
        for o in 0..<c { for j in 0..<(k * k) { t[j * c + o] = wt[o * k * k + j] } }
        return t
    }

    func testDepthwiseConv_forwardAndBackward_matchReference() {
        var rng = Rng(state: 12)
        // 19 channels: two SIMD groups and a tail; 7×7 stride 2 (downsampling), 3×3 and 7×7 stride 1; rows wide
        // enough for the four-pixel interior path at strides 1 and 2
        for (h, w, k, s, p) in [(9, 8, 7, 2, 3), (6, 7, 3, 1, 1), (5, 4, 7, 1, 3), (4, 4, 3, 2, 1), (5, 21, 7, 2, 3), (3, 14, 7, 1, 3)] {
            let b = 2, c = 19
            let x = rng.floats(b * h * w * c), wt = rng.floats(c * k * k), bias = rng.floats(c)
            let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
            let taps = tapsMajor(wt, c: c, k: k)
            var y = [Float](repeating: 0, count: b * oh * ow * c)
            depthwiseConv2dForward(&y, x, taps, bias, b: b, h: h, w: w, c: c, kernel: k, stride: s, padding: p)
            let ref = { (v: [Double]) in referenceConv2d(v, self.d(wt), self.d(bias), b: b, h: h, w: w, c: c, outChannels: c, groups: c, kernel: k, stride: s, padding: p) }
            check("depthwise \(k)×\(k) stride \(s) on \(h)×\(w)", y, ref(d(x)), relTol: 1e-5)
            let r = rng.floats(y.count)
            var dx = [Float](repeating: 0, count: x.count)
            depthwiseConv2dBackward(dinp: &dx, r, taps, b: b, h: h, w: w, c: c, kernel: k, stride: s, padding: p)
            check("depthwise \(k)×\(k) stride \(s) dinp", dx, numericGradient(x, r, ref), relTol: 1e-5)
        }
    }

    /// timm's group_size=1 convolution with out = 2·in (MCi's downsampling and final_conv) as repeat + depthwise.
    func testChannelMultiplier_repeatThenDepthwise_matchesGroupedReference() {
        var rng = Rng(state: 13)
        let b = 1, h = 6, w = 5, c = 5, m = 2, k = 3
        let x = rng.floats(b * h * w * c), wt = rng.floats(c * m * k * k), bias = rng.floats(c * m)
        var wide = [Float](repeating: 0, count: b * h * w * c * m), y = wide
        repeatChannelsForward(&wide, x, n: b * h * w, c: c, multiplier: m)
        depthwiseConv2dForward(&y, wide, tapsMajor(wt, c: c * m, k: k), bias, b: b, h: h, w: w, c: c * m, kernel: k, stride: 1, padding: 1)
        let ref = { (v: [Double]) in referenceConv2d(v, self.d(wt), self.d(bias), b: b, h: h, w: w, c: c, outChannels: c * m, groups: c, kernel: k, stride: 1, padding: 1) }
        check("depthwise ×2 channels", y, ref(d(x)), relTol: 1e-5)
        let r = rng.floats(wide.count)
        var dx = [Float](repeating: 0, count: x.count)
        repeatChannelsBackward(dinp: &dx, r, n: b * h * w, c: c, multiplier: m)
        check("repeat channels backward", dx, numericGradient(x, r) { v in (0..<(h * w * c * m)).map { v[($0 / (c * m)) * c + ($0 % (c * m)) / m] } }, relTol: 1e-6)
    }

    func testChannelAffineMeanAndGate_forwardAndBackward_matchReference() {
        var rng = Rng(state: 14)
        let b = 2, n = 5, c = 11
        let x = rng.floats(b * n * c), scale = rng.floats(c), shift = rng.floats(c), gate = rng.floats(b * c), r = rng.floats(b * n * c)
        var y = [Float](repeating: 0, count: x.count)
        channelAffineForward(&y, x, scale, shift, n: b * n, c: c)
        let affine = { (v: [Double], s: [Double], t: [Double]) in (0..<v.count).map { v[$0] * s[$0 % c] + t[$0 % c] } }
        check("channel affine", y, affine(d(x), d(scale), d(shift)), relTol: 1e-6)
        var dx = [Float](repeating: 0, count: x.count), ds = [Float](repeating: 0, count: c), dt = ds
        channelAffineBackward(dinp: &dx, dscale: &ds, dshift: &dt, r, x, scale, n: b * n, c: c)
        check("channel affine dinp", dx, numericGradient(x, r) { affine($0, self.d(scale), self.d(shift)) }, relTol: 1e-5)
        check("channel affine dscale", ds, numericGradient(scale, r) { affine(self.d(x), $0, self.d(shift)) }, relTol: 1e-5)
        check("channel affine dshift", dt, numericGradient(shift, r) { affine(self.d(x), self.d(scale), $0) }, relTol: 1e-5)

        let mean = { (v: [Double]) in (0..<(b * c)).map { j in (0..<n).reduce(0.0) { $0 + v[((j / c) * n + $1) * c + j % c] } / Double(n) } }
        var m = [Float](repeating: 0, count: b * c)
        meanRowsForward(&m, x, b: b, n: n, c: c)
        check("mean rows", m, mean(d(x)), relTol: 1e-6)
        let rm = rng.floats(b * c)
        var dm = [Float](repeating: 0, count: x.count)
        meanRowsBackward(dinp: &dm, rm, b: b, n: n, c: c)
        check("mean rows backward", dm, numericGradient(x, rm, mean), relTol: 1e-5)

        let gated = { (v: [Double], g: [Double]) in (0..<v.count).map { v[$0] * g[($0 / (n * c)) * c + $0 % c] } }
        var gy = [Float](repeating: 0, count: x.count)
        channelGateForward(&gy, x, gate, b: b, n: n, c: c)
        check("channel gate", gy, gated(d(x), d(gate)), relTol: 1e-6)
        var gx = [Float](repeating: 0, count: x.count), dg = [Float](repeating: 0, count: b * c)
        channelGateBackward(dinp: &gx, dgate: &dg, r, x, gate, b: b, n: n, c: c)
        check("channel gate dinp", gx, numericGradient(x, r) { gated($0, self.d(gate)) }, relTol: 1e-5)
        check("channel gate dgate", dg, numericGradient(gate, r) { gated(self.d(x), $0) }, relTol: 1e-5)
    }
}
