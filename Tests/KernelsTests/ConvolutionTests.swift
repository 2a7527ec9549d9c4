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

    /// The depthwise convolution with GELU applied as it stores: the reference convolution then exact GELU,
    /// and the same bits as the convolution followed by `activationForward`.
    func testDepthwiseConv_fusedActivation_matchesReferenceAndUnfused() {
        var rng = Rng(state: 15)
        for (h, w, k, s, p) in [(9, 8, 7, 2, 3), (6, 13, 3, 1, 1), (4, 4, 3, 2, 1)] {
            let b = 2, c = 19
            let x = rng.floats(b * h * w * c, scale: 3), wt = rng.floats(c * k * k), bias = rng.floats(c)
            let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
            let taps = tapsMajor(wt, c: c, k: k)
            for act in [Activation.gelu, .quickGelu] {
                var fused = [Float](repeating: .nan, count: b * oh * ow * c), apart = fused
                depthwiseConv2dForward(&fused, x, taps, bias, b: b, h: h, w: w, c: c, kernel: k, stride: s, padding: p, activation: act)
                let ref = referenceActivation(referenceConv2d(d(x), d(wt), d(bias), b: b, h: h, w: w, c: c, outChannels: c, groups: c,
                                                              kernel: k, stride: s, padding: p), act)
                check("depthwise \(k)×\(k) stride \(s) + \(act)", fused, ref, relTol: 1e-5)
                depthwiseConv2dForward(&apart, x, taps, bias, b: b, h: h, w: w, c: c, kernel: k, stride: s, padding: p)
                activationForward(&apart, apart, count: apart.count, act)
                XCTAssertEqual(fused, apart, "fused \(act): the bits of the convolution then activationForward")
            }
        }
    }

    /// The tiled pointwise MLP against the Double reference residual + fc2(gelu(fc1(x))), with and without
    /// residual and fc2 bias, keeping the pre-activation; the same bits with 1, 2 and 8 threads (tiles shared
    /// out, or fewer tiles than threads: each GEMM split).
    func testPointwiseMLP_matchesReference_sameBitsWithOneTwoAndEightThreads() {
        var rng = Rng(state: 16)
        let c = 19, hidden = 1000, oc = 13
        let tile = pointwiseMLPTileRows(hidden: hidden)
        XCTAssertEqual(tile, 128)
        let w1 = rng.floats(hidden * c, scale: 0.5), b1 = rng.floats(hidden), w2 = rng.floats(oc * hidden, scale: 0.1), b2 = rng.floats(oc)
        for n in [3 * tile + 5, 70] {   // 4 tiles; one tile
            let x = rng.floats(n * c, scale: 2), res = rng.floats(n * oc)
            let pre = referenceLinear(d(x), d(w1), d(b1), n: n, inFeatures: c, outFeatures: hidden)
            let mlp = referenceLinear(referenceActivation(pre, .gelu), d(w2), nil, n: n, inFeatures: hidden, outFeatures: oc)
            for (residual, bias) in [(true, true), (false, true), (false, false)] {
                let want = (0..<(n * oc)).map { mlp[$0] + (residual ? Double(res[$0]) : 0) + (bias ? Double(b2[$0 % oc]) : 0) }
                func run(threads: Int, keep: Bool) -> (out: [Float], kept: [Float]) {
                    var out = residual ? res : [Float](repeating: .nan, count: n * oc)   // out aliases the residual
                    var kept = [Float](repeating: .nan, count: n * hidden)
                    withThreads(threads) {
                        out.withUnsafeMutableBufferPointer { o in kept.withUnsafeMutableBufferPointer { k in
                            pointwiseMLPForward(o.baseAddress!, adding: residual ? UnsafePointer(o.baseAddress!) : nil, x, fc1: w1, b1, fc2: w2,
                                                bias ? b2 : nil, n: n, c: c, hidden: hidden, outFeatures: oc, .gelu,
                                                preActivation: keep ? k.baseAddress! : nil)
                        } }
                    }
                    return (out, kept)
                }
                let two = run(threads: 2, keep: true)
                check("pointwise MLP n=\(n) residual \(residual) bias \(bias)", two.out, want, relTol: 1e-5)
                check("pointwise MLP n=\(n) pre-activation", two.kept, pre, relTol: 1e-5)
                XCTAssertEqual(run(threads: 2, keep: false).out, two.out, "without keeping the pre-activation: the same bits")
                for threads in [1, 8] {
                    let other = run(threads: threads, keep: true)
                    XCTAssertEqual(other.out, two.out, "n=\(n): \(threads) threads, the bits of 2")
                    XCTAssertEqual(other.kept, two.kept, "n=\(n): \(threads) threads, the pre-activation of 2")
                }
            }
        }
    }
}
