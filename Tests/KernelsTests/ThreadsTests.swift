// The threading model (docs/threading.md): a thread count is bound per caller, never set for the process.
import Foundation
import XCTest
@testable import Kernels

final class ThreadsTests: XCTestCase {
    /// A GEMM large enough to be split, a LayerNorm and an attention forward, with the thread count and
    /// the chunk count our own loops used (parallelFor over 64 items) as seen from inside.
    struct Run: Equatable {
        var gemm: [Float], norm: [Float], attention: [Float]
        var threadsAfter: Int, blasAfter: Int, chunks: Int
    }

    static let m = 192, n = 320, k = 256
    static let b = 2, t = 50, d = 64, heads = 4
    static let inputs: (a: [Float], bm: [Float], x: [Float], w: [Float], bias: [Float], qkv: [Float]) = {
        var rng = Rng(state: 11)
        return (rng.floats(m * k), rng.floats(n * k), rng.floats(m * n), rng.floats(n), rng.floats(n),
                rng.floats(b * t * 3 * d))
    }()

    static func compute() -> Run {
        let i = inputs
        var c = [Float](repeating: 0, count: m * n)
        sgemm(transB: true, m: m, n: n, k: k, a: i.a, lda: k, b: i.bm, ldb: k, c: &c, ldc: n)
        var y = [Float](repeating: 0, count: m * n)
        layerNormForward(&y, mean: nil, rstd: nil, i.x, i.w, i.bias, n: m, c: n, eps: 1e-5)
        var out = [Float](repeating: 0, count: b * t * d), probs = [Float](repeating: 0, count: b * heads * t * t)
        attentionForward(&out, probs: &probs, i.qkv, b: b, t: t, d: d, heads: heads, causal: false)
        let lock = NSLock()
        var chunks = 0
        parallelFor(64) { _ in lock.withLock { chunks += 1 } }
        return Run(gemm: c, norm: y, attention: out, threadsAfter: KernelThreads.current, blasAfter: KernelThreads.blas,
                   chunks: chunks)
    }

    func testConcurrentCalls_withDifferentThreadCounts_doNotDisturbEachOther() {
        let counts = [1, 2, 3, 4]
        let alone = counts.map { n in withThreads(n) { Self.compute() } }
        for (n, run) in zip(counts, alone) {
            XCTAssertEqual(run.chunks, n, "parallelFor uses exactly the bound thread count")
            XCTAssertEqual(run.threadsAfter, n)
            XCTAssertEqual(run.blasAfter, 1, "OpenBLAS stays single-threaded")
        }
        // Each thread count at once on its own thread, many times over: every run equals its run alone.
        let mismatches = Locked<[String]>([])
        let group = DispatchGroup()
        for (n, expected) in zip(counts, alone) {
            group.enter()
            let thread = Thread {
                withThreads(n) {
                    for round in 0..<15 {
                        let run = Self.compute()
                        if run != expected { mismatches.update { $0.append("threads \(n), round \(round)") } }
                    }
                }
                group.leave()
            }
            thread.start()
        }
        group.wait()
        XCTAssertEqual(mismatches.value, [])
        // A binding ends with its body and does not leak into the caller's.
        let outside = KernelThreads.current
        XCTAssertEqual(withThreads(3) { withThreads(1) { KernelThreads.current } }, 1)
        XCTAssertEqual(withThreads(5) { KernelThreads.current }, 5)
        XCTAssertEqual(KernelThreads.current, outside)
    }

    func testUnboundThread_runsKernelsWithOneThread() {
        let seen = Locked(0)
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            parallelFor(64) { _ in seen.update { $0 += 1 } }
            done.signal()
        }
        thread.start()
        done.wait()
        XCTAssertEqual(seen.value, 1, "a thread that never bound a count gets one thread, whatever the test's thread has")
    }

    /// Nested parallel work runs with one thread per chunk: a kernel called inside a chunk does not fan out.
    func testParallelFor_chunksRunWithOneThread() {
        let lock = NSLock()
        var inner: [Int] = []
        withThreads(4) {
            parallelFor(8) { _ in
                let n = KernelThreads.current
                lock.withLock { inner.append(n) }
            }
        }
        XCTAssertEqual(inner, [1, 1, 1, 1])
    }

    /// OpenBLAS 0.3.21 computes each element of C the same way whatever the block it lies in, once a block
    /// holds at least `GEMMGrid.minimumBlockWork` multiply-adds (measured: 0 of 3,400 random split shapes
    /// differ; blocks near 2^20 sometimes do): so a GEMM's bits do not depend on the thread count.
    func testSGEMM_splitAcrossThreads_equalsOneCall() {
        var rng = Rng(state: 5)
        for (m, n, k, transA, transB, beta) in [(1056, 768, 768, false, true, Float(0)), (197, 2304, 768, false, true, 1),
                                                (768, 768, 200, true, false, 1), (300, 500, 400, true, true, 0)] {
            let a = rng.floats(m * k), b = rng.floats(k * n), c = rng.floats(m * n)
            func run(_ threads: Int) -> [Float] {
                var out = c
                withThreads(threads) {
                    sgemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 0.5, a: a, lda: transA ? m : k,
                          b: b, ldb: transB ? k : n, beta: beta, c: &out, ldc: n)
                }
                return out
            }
            let one = run(1)
            for threads in [2, 3, 5, 16] {
                XCTAssertGreaterThan(GEMMGrid(m: m, n: n, k: k, threads: threads).rows * GEMMGrid(m: m, n: n, k: k, threads: threads).columns, 1)
                XCTAssertEqual(run(threads), one, "\(m)×\(n)×\(k) with \(threads) threads")
            }
        }
    }

    /// Sub-batches are the same for every thread count (so are the bits), and their threads add up to at most the bound count.
    func testBatchParallel_subBatchesDoNotDependOnThreads() {
        for b in [1, 7, 8, 16, 19, 64] {
            var seen: [[Range<Int>]] = []
            for threads in [1, 2, 3, 4, 16] {
                let pieces = Locked<[Range<Int>]>([]), used = Locked(0)
                withThreads(threads) {
                    batchParallel(b) { r in
                        pieces.update { $0.append(r) }
                        used.update { $0 = max($0, KernelThreads.current) }
                    }
                }
                let sorted = pieces.value.sorted { $0.lowerBound < $1.lowerBound }
                XCTAssertEqual(sorted.reduce(0) { $0 + $1.count }, b)
                XCTAssertLessThanOrEqual(used.value, threads)
                seen.append(sorted)
            }
            XCTAssertTrue(seen.allSatisfy { $0 == seen[0] }, "batch \(b): \(seen)")
            XCTAssertEqual(seen[0].count, (b + batchPiece - 1) / batchPiece)
        }
    }

    func testGEMMGrid_blocksCoverC_andStayLargeEnough() {
        for (m, n, k, threads) in [(1056, 768, 768, 2), (1056, 3072, 768, 16), (50, 50, 64, 4), (3152, 768, 768, 7),
                                   (16, 10, 512, 8), (192, 320, 256, 4), (800, 64, 50, 3)] {
            let grid = GEMMGrid(m: m, n: n, k: k, threads: threads)
            XCTAssertLessThanOrEqual(grid.rows * grid.columns, threads)
            if grid.rows * grid.columns > 1 {
                for (p, size, multiple, cut) in [(grid.rows, m, grid.rowMultiple, GEMMCuts.measured.rows),
                                                 (grid.columns, n, grid.columnMultiple, GEMMCuts.measured.columns)] {
                    if cut == nil { XCTAssertEqual(p, 1, "a dimension the kernel cannot cut is not cut") }
                    let starts = (0...p).map { GEMMGrid.start($0, of: p, size: size, multiple: multiple) }
                    XCTAssertEqual(starts.first, 0)
                    XCTAssertEqual(starts.last, size)
                    for i in 0..<p {
                        XCTAssertGreaterThanOrEqual(starts[i + 1] - starts[i], 1, "\(m)×\(n)×\(k) / \(threads)")
                        if i + 1 < p, let cut { XCTAssertEqual(starts[i + 1] % cut, 0) }
                    }
                }
                XCTAssertGreaterThanOrEqual(m * n * k / (grid.rows * grid.columns), GEMMGrid.minimumBlockWork)
            }
        }
        let small = GEMMGrid(m: 50, n: 50, k: 64, threads: 4)
        XCTAssertEqual(small.rows * small.columns, 1, "too small to split")
        let vit = GEMMGrid(m: 1056, n: 768, k: 768, threads: 2)
        XCTAssertEqual([vit.rows, vit.columns], [2, 1])
        // With given cuts: the SkylakeX kernels' (16 both ways) and the Haswell kernels' (24 rows, no columns).
        let cls = GEMMGrid(m: 16, n: 3072, k: 768, threads: 2, cuts: GEMMCuts(rows: 16, columns: 16))
        XCTAssertEqual([cls.rows, cls.columns], [1, 2])
        let clsHaswell = GEMMGrid(m: 16, n: 3072, k: 768, threads: 2, cuts: GEMMCuts(rows: 24, columns: nil))
        XCTAssertEqual([clsHaswell.rows, clsHaswell.columns], [1, 1], "16 rows cannot be cut at 24, columns not at all")
        let rows24 = GEMMGrid(m: 1056, n: 768, k: 768, threads: 16, cuts: GEMMCuts(rows: 24, columns: nil))
        XCTAssertEqual([rows24.rows, rows24.columns], [16, 1])
        XCTAssertEqual((1...16).map { rows24.rowStart($0, m: 1056) % 24 }.dropLast(), Array(repeating: 0, count: 15))
    }

    /// The cuts measured on this machine's OpenBLAS kernel: some row cut exists on every kernel seen so far
    /// (16 with SkylakeX, 24 with Haswell), and at the measured multiple random shapes split exactly.
    func testGEMMCuts_measuredOnThisKernel_splitExactly() throws {
        let cuts = GEMMCuts.measured
        print("GEMM cuts measured on this OpenBLAS kernel: rows \(cuts.rows.map(String.init) ?? "none"), columns \(cuts.columns.map(String.init) ?? "none")")
        let rowCut = try XCTUnwrap(cuts.rows, "no row cut keeps the bits: every GEMM would run on one thread")
        var rng = Rng(state: 11)
        var checked = 0
        for _ in 0..<24 {
            let m = 2 * rowCut + Int(rng.next() * 600), n = 64 + Int(rng.next() * 500), k = 32 + Int(rng.next() * 700)
            let transA = rng.next() < 0.5, transB = rng.next() < 0.5
            let a = rng.floats(m * k), b = rng.floats(k * n)
            var whole = [Float](repeating: 0, count: m * n), split = whole
            sgemmOneThread(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 1, a: a, lda: transA ? m : k,
                           b: b, ldb: transB ? k : n, beta: 0, c: &whole, ldc: n)
            let cut = rowCut * (1 + Int(rng.next() * Double(m / rowCut - 1)))
            a.withUnsafeBufferPointer { a in b.withUnsafeBufferPointer { b in split.withUnsafeMutableBufferPointer { c in
                for (from, to) in [(0, cut), (cut, m)] {
                    sgemmOneThread(transA: transA, transB: transB, m: to - from, n: n, k: k, alpha: 1,
                                   a: transA ? a.baseAddress! + from : a.baseAddress! + from * k, lda: transA ? m : k,
                                   b: b.baseAddress!, ldb: transB ? k : n, beta: 0, c: c.baseAddress! + from * n, ldc: n)
                }
            } } }
            XCTAssertTrue(whole.withUnsafeBytes { w in split.withUnsafeBytes { w.elementsEqual($0) } }, "\(m)×\(n)×\(k) cut at row \(cut)")
            checked += 1
        }
        XCTAssertEqual(checked, 24)
    }

    /// withDenormalsFlushed: a subnormal result is 0 and a subnormal input reads as 0 on the caller, in
    /// parallelFor's chunks and in a split sgemm; afterwards subnormals are back on the caller and on the
    /// workers, also on GCD workers first started from a flushing thread (they inherit its mode).
    func testDenormalsFlushed_onTheCallerAndItsWorkers_restoredAfterwards() {
        let count = 64
        let tiny = [Float](repeating: 1e-30, count: count), small = [Float](repeating: 1e-10, count: count)
        let subnormal = [Float](repeating: Float(bitPattern: 1), count: count), one = [Float](repeating: 1, count: count)
        /// (x·y, s·1) for every item, in parallelFor's chunks, and an sgemm of subnormals times ones
        func run() -> (products: [Float], inputs: [Float], gemm: [Float]) {
            var products = [Float](repeating: -1, count: count), inputs = products
            products.withUnsafeMutableBufferPointer { p in inputs.withUnsafeMutableBufferPointer { q in
                let p = p.baseAddress!, q = q.baseAddress!
                parallelFor(count, grain: 1) { r in for i in r { p[i] = tiny[i] * small[i]; q[i] = subnormal[i] * one[i] } }
            } }
            let m = 256
            let a = [Float](repeating: Float(bitPattern: 1), count: m * m), b = [Float](repeating: 1, count: m * m)
            var c = [Float](repeating: -1, count: m * m)
            sgemm(m: m, n: m, k: m, a: a, lda: m, b: b, ldb: m, c: &c, ldc: m)
            return (products, inputs, c)
        }
        withThreads(2) {
            XCTAssertFalse(denormalsFlushed)
            let before = run()
            XCTAssertTrue(before.products.allSatisfy { $0 > 0 && $0.isSubnormal }, "IEEE subnormals before the scope")
            let flushed = withDenormalsFlushed { () -> (products: [Float], inputs: [Float], gemm: [Float]) in
                XCTAssertTrue(denormalsFlushed)
                return run()
            }
            XCTAssertFalse(denormalsFlushed)
            XCTAssertEqual(flushed.products, [Float](repeating: 0, count: count), "subnormal results flushed to 0")
            XCTAssertEqual(flushed.inputs, [Float](repeating: 0, count: count), "subnormal inputs read as 0")
            XCTAssertTrue(flushed.gemm.allSatisfy { $0 == 0 }, "sgemm's blocks on the workers read subnormals as 0")
            let after = run()
            XCTAssertTrue(after.products.allSatisfy { $0 > 0 && $0.isSubnormal }, "subnormals again after the scope")
            XCTAssertEqual(after.inputs, subnormal)
            XCTAssertTrue(after.gemm.allSatisfy { $0 > 0 && $0.isSubnormal })
        }
    }

    /// Large buffers are zeroed on the caller's threads in pieces: every float is 0 whatever the thread
    /// count, also in memory the allocator hands back dirty (filled with 7 and freed just before), and for
    /// sizes that are no multiple of the piece.
    func testLargeBuffer_isZeroedWhole_withOneTwoAndThreeThreads() {
        let sizes = [Buffer.parallelZeroFloats, 2 * Buffer.parallelZeroFloats + 12_345, Buffer.parallelZeroFloats - 1]
        for threads in [1, 2, 3] {
            for n in sizes {
                for _ in 0..<3 {
                    let dirty = Buffer(uninitializedCount: n)
                    dirty.data.update(repeating: 7, count: n)
                }
                let b = withThreads(threads) { Buffer(count: n) }
                let nonzero = UnsafeBufferPointer(start: b.data, count: n).firstIndex { $0 != 0 }
                XCTAssertNil(nonzero, "\(threads) threads, \(n) floats: float \(nonzero ?? -1) is not 0")
            }
        }
    }
}

/// A value shared by threads, behind a lock.
final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T { lock.withLock { stored } }
    func update(_ body: (inout T) -> Void) { lock.withLock { body(&stored) } }
}
