import COpenBLAS
import Foundation

// The threading model (docs/threading.md): every numeric call runs under a thread count bound to the
// calling thread — a job's `threads`, a CLI command's `--threads` — and nothing else. OpenBLAS is kept
// single-threaded for the whole process (it has no per-call thread count), so no call can change
// another's threads; GEMMs large enough to share are split into blocks by `sgemm` below.

/// The threads the numeric kernels called on this thread may use.
public enum KernelThreads {
    /// Bound by `withThreads`; 1 where nothing is bound (a thread that never asked for more).
    @TaskLocal static var bound = 1

    /// The thread count of the kernels called here.
    public static var current: Int { bound }

    /// OpenBLAS's own thread count: 1 for the whole process once any kernel has run.
    public static var blas: Int { Int(openblas_get_num_threads()) }
}

/// OpenBLAS is set to one thread once per process, before our first GEMM: our threads are the only ones.
let blasSingleThreaded: Void = { openblas_set_num_threads(1) }()

/// Runs `body` with `n` threads for every kernel it calls on this thread (and, through `parallelFor`,
/// on the threads those kernels use). Bindings nest; other threads are not affected.
public func withThreads<R>(_ n: Int, _ body: () throws -> R) rethrows -> R {
    precondition(n >= 1, "withThreads: at least one thread")
    _ = blasSingleThreaded
    return try KernelThreads.$bound.withValue(n, operation: body)
}

/// Runs `body` over `0..<n` split into at most `KernelThreads.current` contiguous chunks,
/// in parallel when each chunk holds at least `grain` items. Each chunk runs with one thread:
/// kernels called inside do not fan out again.
@inline(__always)
public func parallelFor(_ n: Int, grain: Int = 1, _ body: (Range<Int>) -> Void) {
    let chunks = min(KernelThreads.current, n / max(grain, 1))
    if chunks <= 1 { if n > 0 { body(0..<n) }; return }
    let profile = Profiling.capture(), flushed = Denormals.flushed, attention = AttentionKernel.bound
    DispatchQueue.concurrentPerform(iterations: chunks) { c in
        Denormals.inMode(flushed) {
            Profiling.bind(profile) {
                AttentionKernel.bind(attention) {
                    KernelThreads.$bound.withValue(1) { body((n * c / chunks)..<(n * (c + 1) / chunks)) }
                }
            }
        }
    }
}

/// Runs `body` over a batch of `b` items in sub-batches of `batchPiece` items (the last may be smaller),
/// sub-batches at the same time on up to `KernelThreads.current` threads, each sub-batch's kernels with
/// its share of the threads. The sub-batches do not depend on the thread count, so neither do the bits
/// of the results: for batched inference this scales better than threading every GEMM, and a job's
/// features are the same whatever `threads` it runs with.
public func batchParallel(_ b: Int, _ body: (Range<Int>) -> Void) {
    let pieces = (b + batchPiece - 1) / batchPiece, threads = KernelThreads.current
    let workers = min(threads, pieces)
    func piece(_ p: Int) -> Range<Int> { (p * batchPiece)..<min(b, (p + 1) * batchPiece) }
    if workers <= 1 { for p in 0..<pieces { body(piece(p)) }; return }
    let profile = Profiling.capture(), flushed = Denormals.flushed, attention = AttentionKernel.bound
    DispatchQueue.concurrentPerform(iterations: workers) { w in
        // Worker w takes pieces w, w + workers, ...; the threads are shared out as evenly as they go.
        let share = threads / workers + (w < threads % workers ? 1 : 0)
        Denormals.inMode(flushed) {
            Profiling.bind(profile) {
                AttentionKernel.bind(attention) {
                    KernelThreads.$bound.withValue(share) {
                        for p in stride(from: w, to: pieces, by: workers) { body(piece(p)) }
                    }
                }
            }
        }
    }
}

/// Runs `body` with denormal (subnormal) floats flushed to zero, as results and as inputs, in every kernel
/// it calls on this thread and on the threads those kernels use (`parallelFor`, `batchParallel`, `sgemm`
/// hand the mode on to their workers). x86-64: MXCSR's FTZ and DAZ bits; aarch64: FPCR's FZ bit; elsewhere
/// nothing changes. A value below 1.2e-38 then reads and is written as 0: a difference far below any
/// tolerance, where an operation on a denormal otherwise costs a microcode assist of ~100 cycles on x86
/// (softmax probabilities and gradients through small layer scales make them by the thousand).
/// Bindings nest; when the outermost ends, this thread is back to IEEE denormals.
public func withDenormalsFlushed<R>(_ body: () throws -> R) rethrows -> R {
    if Denormals.flushed { return try body() }
    Denormals.setFlushing(true)
    defer { Denormals.setFlushing(false) }
    return try Denormals.$flushed.withValue(true, operation: body)
}

/// Whether `withDenormalsFlushed` is in force on this thread.
public var denormalsFlushed: Bool { Denormals.flushed }

enum Denormals {
    @TaskLocal static var flushed = false

    /// Sets (or clears) this thread's flush-to-zero and denormals-are-zero modes.
    static func setFlushing(_ on: Bool) {
        #if arch(x86_64) || arch(arm64)
        var env = fenv_t()
        fegetenv(&env)
        #if arch(x86_64)
        let bits: UInt32 = 0x8040   // FTZ (bit 15) | DAZ (bit 6)
        guard (env.__mxcsr & bits != 0) != on else { return }
        if on { env.__mxcsr |= bits } else { env.__mxcsr &= ~bits }
        #else
        let bit: UInt32 = 1 << 24   // FZ
        guard (UInt32(truncatingIfNeeded: env.__fpcr) & bit != 0) != on else { return }
        if on { env.__fpcr |= .init(bit) } else { env.__fpcr &= ~.init(bit) }
        #endif
        fesetenv(&env)
        #endif
    }

    /// Runs a worker's `body` in the mode of the thread that handed the work out. A worker that is not
    /// flushing is set back to IEEE denormals first: a thread starts with its creator's floating-point
    /// environment, so a GCD worker started from a flushing thread begins flushed.
    @inline(__always) static func inMode(_ flushed: Bool, _ body: () -> Void) {
        if flushed { withDenormalsFlushed(body); return }
        if !Denormals.flushed { setFlushing(false) }
        body()
    }
}

/// Items per sub-batch of `batchParallel`: 8 images are 400 rows per GEMM for ViT-B/32, 1576 for ViT-B/16.
public let batchPiece = 8

/// Blocks of C a GEMM of (m,n,k) is split into with `threads` threads: a grid of `rows` × `columns`
/// blocks, each at least `minimumBlockWork` multiply-adds, whose boundaries fall where this process's
/// OpenBLAS kernel gives every element of C the bits of one unsplit call (`GEMMCuts.measured`: on
/// multiples of 16 rows or columns with the SkylakeX kernels, of 24 rows and no column cut with the
/// Haswell kernels and the Zen ones OpenBLAS 0.3.21 picks on Zen 2 and 3), the grid chosen to pack the least of A and B
/// per block. (1, 1) when not worth it or not possible.
struct GEMMGrid: Equatable {
    let rows: Int, columns: Int
    /// Boundaries fall on multiples of these.
    let rowMultiple: Int, columnMultiple: Int
    static let minimumBlockWork = 1 << 21

    init(rows: Int, columns: Int, rowMultiple: Int = 16, columnMultiple: Int = 16) {
        self.rows = rows
        self.columns = columns
        self.rowMultiple = rowMultiple
        self.columnMultiple = columnMultiple
    }

    init(m: Int, n: Int, k: Int, threads: Int, cuts: GEMMCuts = .measured) {
        let rowMultiple = cuts.rows ?? max(1, m), columnMultiple = cuts.columns ?? max(1, n)
        let work = m * n * k
        let mUnits = cuts.rows == nil ? 1 : (m + rowMultiple - 1) / rowMultiple
        let nUnits = cuts.columns == nil ? 1 : (n + columnMultiple - 1) / columnMultiple
        var blocks = min(threads, work / Self.minimumBlockWork, mUnits * nUnits)
        while blocks > 1 {
            var best: (cost: Double, rows: Int)?
            for pm in 1...blocks where blocks % pm == 0 {
                let pn = blocks / pm
                guard pm <= mUnits, pn <= nUnits else { continue }
                let cost = Double(m) / Double(pm) + Double(n) / Double(pn)
                if best == nil || cost < best!.cost { best = (cost, pm) }
            }
            if let best {
                self.init(rows: best.rows, columns: blocks / best.rows, rowMultiple: rowMultiple, columnMultiple: columnMultiple)
                return
            }
            blocks -= 1
        }
        self.init(rows: 1, columns: 1, rowMultiple: rowMultiple, columnMultiple: columnMultiple)
    }

    /// Start of row block `i` (of `rows`) of a C with `m` rows; `rowStart(rows)` is `m`.
    @inline(__always) func rowStart(_ i: Int, m: Int) -> Int { Self.start(i, of: rows, size: m, multiple: rowMultiple) }
    @inline(__always) func columnStart(_ j: Int, n: Int) -> Int { Self.start(j, of: columns, size: n, multiple: columnMultiple) }

    /// Start of part `i` of `p` over `size` (on a multiple of `multiple`; part p is `size`).
    @inline(__always)
    static func start(_ i: Int, of p: Int, size: Int, multiple: Int) -> Int {
        i == p ? size : min(size, ((size + multiple - 1) / multiple) * i / p * multiple)
    }
}

/// Where this process's OpenBLAS kernel can cut a GEMM into blocks without changing a bit of C, measured
/// once per process. OpenBLAS's kernels compute C in panels of rows and columns, and some compute the
/// lanes of a panel, or its last partial panel, in another order of operations: the Haswell and Zen kernels
/// of OpenBLAS 0.3.21 give a row other bits unless a cut falls on a multiple of 24 rows,
/// and any column cut changes some; the SkylakeX ones take any multiple of 16 in both. The measurement
/// tries each candidate multiple on products of four transposes and two betas, two cuts each, and keeps
/// the smallest one whose blocks all equal the unsplit call (nil: that dimension is never cut).
struct GEMMCuts: Equatable, Sendable {
    let rows: Int?, columns: Int?

    static let candidates = [16, 24, 32, 48, 64, 96, 128]
    static let measured: GEMMCuts = measure()

    static func measure() -> GEMMCuts {
        _ = blasSingleThreaded
        var state: UInt64 = 0x5eed
        func floats(_ count: Int) -> [Float] {
            (0..<count).map { _ in
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                return Float((z ^ (z >> 31)) >> 40) / Float(1 << 24) * 2 - 1
            }
        }
        // (m, n, k, transA, transB, beta): blocks of these stay above minimumBlockWork.
        let shapes = [(480, 416, 200, false, true, Float(0)), (432, 400, 304, true, false, 1),
                      (400, 464, 136, false, false, 1), (464, 432, 152, true, true, 0)]
        let cases = shapes.map { s in (shape: s, a: floats(s.0 * s.2), b: floats(s.2 * s.1), c: floats(s.0 * s.1)) }
        func exact(_ multiple: Int, rows: Bool) -> Bool {
            for x in cases {
                let (m, n, k, ta, tb, beta) = x.shape
                let lda = ta ? m : k, ldb = tb ? k : n
                var whole = x.c
                sgemmOneThread(transA: ta, transB: tb, m: m, n: n, k: k, alpha: 0.5, a: x.a, lda: lda, b: x.b, ldb: ldb,
                               beta: beta, c: &whole, ldc: n)
                let size = rows ? m : n
                for cut in Set([multiple * max(1, size / multiple / 2), multiple * max(1, size / multiple / 3)]) where cut < size {
                    var split = x.c
                    x.a.withUnsafeBufferPointer { a in x.b.withUnsafeBufferPointer { b in split.withUnsafeMutableBufferPointer { c in
                        for (from, to) in [(0, cut), (cut, size)] {
                            if rows {
                                sgemmOneThread(transA: ta, transB: tb, m: to - from, n: n, k: k, alpha: 0.5,
                                               a: ta ? a.baseAddress! + from : a.baseAddress! + from * lda, lda: lda,
                                               b: b.baseAddress!, ldb: ldb, beta: beta, c: c.baseAddress! + from * n, ldc: n)
                            } else {
                                sgemmOneThread(transA: ta, transB: tb, m: m, n: to - from, k: k, alpha: 0.5, a: a.baseAddress!, lda: lda,
                                               b: tb ? b.baseAddress! + from * ldb : b.baseAddress! + from, ldb: ldb,
                                               beta: beta, c: c.baseAddress! + from, ldc: n)
                            }
                        }
                    } } }
                    if !whole.withUnsafeBytes({ w in split.withUnsafeBytes { w.elementsEqual($0) } }) { return false }
                }
            }
            return true
        }
        return GEMMCuts(rows: candidates.first { exact($0, rows: true) }, columns: candidates.first { exact($0, rows: false) })
    }
}
