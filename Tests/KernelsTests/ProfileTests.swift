import XCTest
@testable import Kernels

/// The breakdown timers of `nolad bench`: off unless a profile collects, and then every kernel counted once.
/// (No assertion on how long anything takes: only calls, FLOPs and shapes.)
final class ProfileTests: XCTestCase {
    func layerNorm(rows n: Int, c: Int) {
        let x = Buffer((0..<(n * c)).map { Float($0 % 7) }), y = Buffer(count: n * c)
        let w = Buffer([Float](repeating: 1, count: c)), b = Buffer(count: c)
        layerNormForward(y.data, mean: nil, rstd: nil, x.data, w.data, b.data, n: n, c: c, eps: 1e-5)
    }

    func testTimers_areOffByDefault_andCollectOnlyInsideCollect() {
        let profile = KernelProfile()
        XCTAssertFalse(kernelProfileActive)
        layerNorm(rows: 4, c: 8)
        XCTAssertEqual(profile.entry(.layerNorm, .forward).calls, 0)
        XCTAssertEqual(profile.totalThreadSeconds, 0)

        profile.collect {
            XCTAssertTrue(kernelProfileActive)
            layerNorm(rows: 4, c: 8)
            let a = Buffer(count: 2 * 4), b = Buffer(count: 4 * 3), c = Buffer(count: 2 * 3)
            sgemm(m: 2, n: 3, k: 4, a: a.data, lda: 4, b: b.data, ldb: 3, c: c.data, ldc: 3)
        }
        XCTAssertFalse(kernelProfileActive)
        XCTAssertEqual(profile.entry(.layerNorm, .forward).calls, 1)
        XCTAssertEqual(profile.entry(.layerNorm, .backward).calls, 0)
        XCTAssertEqual(profile.entry(.gemm, .forward).calls, 1)
        XCTAssertEqual(profile.entry(.gemm, .forward).flops, 2 * 2 * 3 * 4)
        XCTAssertEqual(profile.gemmShapes.map(\.shape), [GEMMShape(m: 2, n: 3, k: 4, transA: false, transB: false)])
        XCTAssertGreaterThan(profile.entry(.copy, .forward).calls, 0, "the zero-filled Buffers inside collect")

        // after collect, nothing more is recorded
        layerNorm(rows: 4, c: 8)
        XCTAssertEqual(profile.entry(.layerNorm, .forward).calls, 1)
    }

    func testNestedKernels_countOnce_andParallelChunks_reportToTheCallersProfile() {
        let b = 2, t = 5, d = 8, heads = 2, hd = d / heads
        let qkv = Buffer((0..<(b * t * 3 * d)).map { Float($0 % 11) / 11 })
        let out = Buffer(count: b * t * d), probs = Buffer(count: b * heads * t * t)
        let profile = KernelProfile()
        withThreads(2) {
            profile.collect {
                // 4 heads over 2 threads: the small GEMMs run on parallelFor's threads
                attentionForward(out.data, probs: probs.data, qkv.data, b: b, t: t, d: d, heads: heads, causal: false)
                withProfilePhase(.backward) {
                    let dqkv = Buffer(count: b * t * 3 * d)
                    attentionBackward(dqkv: dqkv.data, out.data, qkv.data, probs: probs.data, b: b, t: t, d: d, heads: heads)
                }
                let x = Buffer(count: 3 * 4), w = Buffer(count: 5 * 4), bias = Buffer(count: 5), y = Buffer(count: 3 * 5)
                linearForward(y.data, x.data, w.data, bias.data, n: 3, inFeatures: 4, outFeatures: 5)
            }
        }
        let attention = profile.entry(.attention, .forward)
        XCTAssertEqual(attention.calls, 1, "one op, however many heads and threads")
        // per (image, head): scores t·t·hd and p·v t·hd·t multiply-adds
        XCTAssertEqual(attention.flops, b * heads * 2 * (t * t * hd + t * hd * t))
        // backward: dO·vᵀ, pᵀ·dO, ds·k, dsᵀ·q, each t·t·hd multiply-adds
        XCTAssertEqual(profile.entry(.attention, .backward).flops, b * heads * 4 * 2 * t * t * hd)
        XCTAssertEqual(profile.entry(.gemm, .forward).calls, 1, "the small GEMMs are attention's, the linear's is a GEMM")
        XCTAssertEqual(profile.entry(.gemm, .forward).flops, 2 * 3 * 5 * 4)
        XCTAssertEqual(profile.entry(.bias, .forward).calls, 1)
        XCTAssertEqual(profile.gemmShapes.map(\.shape), [GEMMShape(m: 3, n: 5, k: 4, transA: false, transB: true)])
        XCTAssertEqual(profile.totalFlops, attention.flops + profile.entry(.attention, .backward).flops + 120)
    }
}
