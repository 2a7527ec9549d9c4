// The tiled attention kernel (Kernels/Attention.swift, `AttentionKernel.tiled`) at the models' head size 64
// and their token counts (CLIP B/32 50, with 16 prompts 66, DINO B/16 197), forward and backward, against the
// naive Double references, and against the per-head sgemm kernel it replaces.
import Foundation
import XCTest
@testable import Kernels

final class AttentionTests: XCTestCase {
    /// qkv (B,T,3D) with head size 64 and a dout (B,T,D).
    func inputs(b: Int, t: Int, heads: Int, seed: UInt64) -> (qkv: [Float], dout: [Float], d: Int) {
        var rng = Rng(state: seed)
        let d = 64 * heads
        return (rng.floats(b * t * 3 * d, scale: 1.5), rng.floats(b * t * d), d)
    }

    func testDefaultIsPerHead_tiledWhenBoundAndTheHeadSizeFits() {
        XCTAssertEqual(AttentionKernel.resolved(hd: 64), .perHeadGEMM)
        XCTAssertEqual(withAttentionKernel(.tiled) { AttentionKernel.resolved(hd: 64) }, .tiled)
        XCTAssertEqual(withAttentionKernel(.tiled) { AttentionKernel.resolved(hd: 4) }, .perHeadGEMM)
        // the choice reaches the threads of batchParallel (where the models call attention from)
        let seen = withThreads(2) {
            withAttentionKernel(.tiled) {
                let lock = NSLock()
                var kernels: [AttentionKernel] = []
                batchParallel(2 * batchPiece) { _ in
                    let k = AttentionKernel.resolved(hd: 64)
                    lock.withLock { kernels.append(k) }
                }
                return kernels
            }
        }
        XCTAssertEqual(seen, [.tiled, .tiled])
    }

    func testTiledForward_matchesReference_atTheModelsTokenCounts_withAndWithoutCausalMask() {
        for (t, causal) in [(50, false), (66, false), (197, false), (20, true), (77, true)] {
            let b = 2, heads = 2
            let (qkv, _, d) = inputs(b: b, t: t, heads: heads, seed: UInt64(t))
            var out = [Float](repeating: .nan, count: b * t * d), probs = [Float](repeating: .nan, count: b * heads * t * t)
            withAttentionKernel(.tiled) {
                attentionForward(&out, probs: &probs, qkv, b: b, t: t, d: d, heads: heads, causal: causal)
            }
            check("tiled attention forward T=\(t) causal=\(causal)", out,
                  referenceAttention(qkv.map(Double.init), b: b, t: t, d: d, heads: heads, causal: causal), relTol: 1e-5)
            // probs as the backward needs them: rows sum to 1, masked entries 0
            for row in 0..<(b * heads * t) {
                let i = row % t, p = probs[(row * t)..<((row + 1) * t)]
                XCTAssertEqual(Double(p.reduce(0, +)), 1, accuracy: 1e-5)
                if causal { XCTAssertTrue(p.dropFirst(i + 1).allSatisfy { $0 == 0 }, "row \(i) past the mask") }
            }
            // without probs (inference) the same output
            var bare = [Float](repeating: .nan, count: b * t * d)
            withAttentionKernel(.tiled) {
                attentionForward(&bare, probs: nil, qkv, b: b, t: t, d: d, heads: heads, causal: causal)
            }
            XCTAssertEqual(bare, out)
        }
    }

    func testTiledBackward_matchesReference_writingAndAccumulating() {
        for (t, causal) in [(50, false), (66, false), (197, false), (77, true)] {
            let b = 2, heads = 2
            let (qkv, dout, d) = inputs(b: b, t: t, heads: heads, seed: 100 + UInt64(t))
            var out = [Float](repeating: 0, count: b * t * d), probs = [Float](repeating: 0, count: b * heads * t * t)
            let want = referenceAttentionBackward(qkv.map(Double.init), dout: dout.map(Double.init), b: b, t: t, d: d,
                                                  heads: heads, causal: causal)
            var written = [Float](repeating: .nan, count: qkv.count)
            let start = Rng(state: 7).floats0(qkv.count)
            var accumulated = start
            withAttentionKernel(.tiled) {
                attentionForward(&out, probs: &probs, qkv, b: b, t: t, d: d, heads: heads, causal: causal)
                attentionBackward(dqkv: &written, dout, qkv, probs: probs, b: b, t: t, d: d, heads: heads, accumulate: false)
                attentionBackward(dqkv: &accumulated, dout, qkv, probs: probs, b: b, t: t, d: d, heads: heads)
            }
            check("tiled attention backward T=\(t) causal=\(causal)", written, want, relTol: 1e-5)
            check("tiled attention backward T=\(t) causal=\(causal), accumulated", accumulated,
                  zip(want, start).map { $0 + Double($1) }, relTol: 1e-5)
        }
    }

    func testTiledSingleQueryRow_equalsThatRowOfTheFullAttention_forwardAndBackward() {
        let b = 2, t = 197, heads = 2
        let (qkv, _, d) = inputs(b: b, t: t, heads: heads, seed: 9)
        let r = Rng(state: 11).floats0(b * d, scale: 1)
        for (causal, row) in [(false, 0), (true, t - 1), (true, 5)] {
            withAttentionKernel(.tiled) {
                var full = [Float](repeating: 0, count: b * t * d), probs = [Float](repeating: 0, count: b * heads * t * t)
                attentionForward(&full, probs: &probs, qkv, b: b, t: t, d: d, heads: heads, causal: causal)
                var one = [Float](repeating: 0, count: b * d), oneProbs = [Float](repeating: 0, count: b * heads * t)
                attentionForward(&one, probs: &oneProbs, qkv, b: b, t: t, d: d, heads: heads, causal: causal, onlyRow: row)
                var wantOut: [Double] = []
                for bi in 0..<b { for j in 0..<d { wantOut.append(Double(full[(bi * t + row) * d + j])) } }
                check("tiled attention row \(row) causal=\(causal) forward", one, wantOut, relTol: 1e-6)
                var dfull = [Float](repeating: 0, count: b * t * d)
                for bi in 0..<b { for j in 0..<d { dfull[(bi * t + row) * d + j] = r[bi * d + j] } }
                var gFull = [Float](repeating: 0, count: qkv.count), gOne = gFull
                attentionBackward(dqkv: &gFull, dfull, qkv, probs: probs, b: b, t: t, d: d, heads: heads)
                attentionBackward(dqkv: &gOne, r, qkv, probs: oneProbs, b: b, t: t, d: d, heads: heads, onlyRow: row)
                check("tiled attention row \(row) causal=\(causal) backward", gOne, gFull.map(Double.init), relTol: 1e-5)
            }
        }
    }

    func testTiledAndPerHeadKernels_agree() {
        let b = 3, t = 66, heads = 3
        let (qkv, dout, d) = inputs(b: b, t: t, heads: heads, seed: 21)
        func run(_ kernel: AttentionKernel) -> (out: [Float], probs: [Float], dqkv: [Float]) {
            var out = [Float](repeating: 0, count: b * t * d), probs = [Float](repeating: 0, count: b * heads * t * t)
            var dqkv = [Float](repeating: 0, count: qkv.count)
            withAttentionKernel(kernel) {
                attentionForward(&out, probs: &probs, qkv, b: b, t: t, d: d, heads: heads, causal: false)
                attentionBackward(dqkv: &dqkv, dout, qkv, probs: probs, b: b, t: t, d: d, heads: heads, accumulate: false)
            }
            return (out, probs, dqkv)
        }
        let tiled = run(.tiled), perHead = run(.perHeadGEMM)
        check("tiled vs per-head out", tiled.out, perHead.out.map(Double.init), relTol: 1e-6)
        check("tiled vs per-head probs", tiled.probs, perHead.probs.map(Double.init), relTol: 1e-6)
        check("tiled vs per-head dqkv", tiled.dqkv, perHead.dqkv.map(Double.init), relTol: 1e-6)
    }

    func testTiledKernel_sameBitsWithAnyThreadCount() {
        let b = 2, t = 197, heads = 3
        let (qkv, dout, d) = inputs(b: b, t: t, heads: heads, seed: 33)
        func run(_ threads: Int) -> [Float] {
            var out = [Float](repeating: 0, count: b * t * d), probs = [Float](repeating: 0, count: b * heads * t * t)
            var dqkv = [Float](repeating: 0, count: qkv.count)
            withThreads(threads) {
                withAttentionKernel(.tiled) {
                    attentionForward(&out, probs: &probs, qkv, b: b, t: t, d: d, heads: heads, causal: false)
                    attentionBackward(dqkv: &dqkv, dout, qkv, probs: probs, b: b, t: t, d: d, heads: heads, accumulate: false)
                }
            }
            return out + probs + dqkv
        }
        let one = run(1)
        for threads in [2, 5] { XCTAssertEqual(run(threads), one, "\(threads) threads") }
    }

    func testSIMDSoftmaxRows_matchReference_forEveryLengthAndMask() {
        var rng = Rng(state: 44)
        for n in [1, 7, 8, 9, 16, 50, 66, 197] {
            let x = rng.floats(n, scale: 8)
            for valid in Set([1, n / 2 + 1, n]) where valid <= n {
                let want = referenceSoftmax(x.prefix(valid).map(Double.init), n: 1, c: valid) + [Double](repeating: 0, count: n - valid)
                var row = x
                softmaxRowVector(&row, n: n, valid: valid)
                check("softmaxRowVector n=\(n) valid=\(valid)", row, want, relTol: 1e-6)
                let ld = (n + 15) / 16 * 16
                var padded = x + [Float](repeating: .nan, count: ld - n)
                softmaxRowPadded(&padded, ld: ld, valid: valid)
                check("softmaxRowPadded n=\(n) valid=\(valid)", padded, want + [Double](repeating: 0, count: ld - n), relTol: 1e-6)
            }
        }
    }

    func testSmallGEMM_matchesReference_forBothLayoutsOfA_andRowTails() {
        var rng = Rng(state: 3)
        for (m, n, k) in [(13, 32, 64), (6, 16, 1), (1, 48, 7), (50, 64, 197)] {
            let a = rng.floats(m * k), bm = rng.floats(k * n), c0 = rng.floats(m * n)
            var want = [Double](repeating: 0, count: m * n)
            for i in 0..<m { for j in 0..<n { for e in 0..<k { want[i * n + j] += Double(a[i * k + e]) * Double(bm[e * n + j]) } } }
            // A row-major (ars k, acs 1), C = 0.5·A·B + C
            var c = c0
            smallGEMM(m: m, n: n, k: k, alpha: 0.5, a: a, ars: k, acs: 1, b: bm, ldb: n, accumulate: true, c: &c, ldc: n)
            check("smallGEMM \(m)×\(n)×\(k) accumulate", c, zip(want, c0).map { 0.5 * $0 + Double($1) }, relTol: 1e-6)
            // A given transposed (ars 1, acs m), C written
            var at = [Float](repeating: 0, count: m * k)
            for i in 0..<m { for e in 0..<k { at[e * m + i] = a[i * k + e] } }
            var w = [Float](repeating: .nan, count: m * n)
            smallGEMM(m: m, n: n, k: k, a: at, ars: 1, acs: m, b: bm, ldb: n, accumulate: false, c: &w, ldc: n)
            check("smallGEMM \(m)×\(n)×\(k) Aᵀ", w, want, relTol: 1e-6)
        }
    }
}

extension Rng {
    /// `floats` from a fresh generator (a value, for use in an expression).
    func floats0(_ n: Int, scale: Double = 0.5) -> [Float] { var r = self; return r.floats(n, scale: scale) }
}
