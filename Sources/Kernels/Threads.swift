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
/// blocks, each at least 16 × 16 (boundaries on multiples of 16) and at least `minimumBlockWork`
/// multiply-adds, the grid chosen to pack the least of A and B per block. (1, 1) when not worth it.
struct GEMMGrid: Equatable {
    let rows: Int, columns: Int
    static let minimumBlockWork = 1 << 21

    init(rows: Int, columns: Int) { self.rows = rows; self.columns = columns }

    init(m: Int, n: Int, k: Int, threads: Int) {
        let work = m * n * k, mUnits = (m + 15) / 16, nUnits = (n + 15) / 16
        var blocks = min(threads, work / Self.minimumBlockWork, mUnits * nUnits)
        while blocks > 1 {
            var best: (cost: Double, rows: Int)?
            for pm in 1...blocks where blocks % pm == 0 {
                let pn = blocks / pm
                guard pm <= mUnits, pn <= nUnits else { continue }
                let cost = Double(m) / Double(pm) + Double(n) / Double(pn)
                if best == nil || cost < best!.cost { best = (cost, pm) }
            }
            if let best { self.init(rows: best.rows, columns: blocks / best.rows); return }
            blocks -= 1
        }
        self.init(rows: 1, columns: 1)
    }

    /// Start of part `i` of `p` over `size` (on a multiple of 16; part p is `size`).
    @inline(__always)
    static func start(_ i: Int, of p: Int, size: Int) -> Int {
        i == p ? size : min(size, ((size + 15) / 16) * i / p * 16)
    }
}
