import COpenBLAS
import Foundation

/// C (m,n) = alpha · op(A) · op(B) + beta · C, row-major; op(A) is (m,k), op(B) is (k,n).
/// With more than one thread (`KernelThreads.current`) a large product is split into blocks of C
/// (`GEMMGrid`), each a single-threaded OpenBLAS call on one of our threads.
@inline(__always)
public func sgemm(transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int,
                  alpha: Float = 1, a: UnsafePointer<Float>, lda: Int,
                  b: UnsafePointer<Float>, ldb: Int,
                  beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int) {
    if Profiling.on, let context = Profiling.context {
        // Its FLOPs go to the timed op it runs in (attention), else it is timed as a GEMM itself.
        let shape = GEMMShape(m: m, n: n, k: k, transA: transA, transB: transB)
        let (op, phase) = context.inside ?? (.gemm, context.phase)
        context.profile.addFlops(op, phase, shape)
        profiled(.gemm, phase) {
            sgemmSplit(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda,
                       b: b, ldb: ldb, beta: beta, c: c, ldc: ldc)
        }
        return
    }
    sgemmSplit(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda,
               b: b, ldb: ldb, beta: beta, c: c, ldc: ldc)
}

/// `sgemm` without the profile: the product on this thread, or split into blocks over the caller's threads.
@inline(__always)
func sgemmSplit(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
                b: UnsafePointer<Float>, ldb: Int, beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
    let threads = KernelThreads.current
    let grid = threads == 1 ? GEMMGrid(rows: 1, columns: 1) : GEMMGrid(m: m, n: n, k: k, threads: threads)
    if grid.rows * grid.columns == 1 {
        sgemmOneThread(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda,
                       b: b, ldb: ldb, beta: beta, c: c, ldc: ldc)
        return
    }
    let flushed = Denormals.flushed
    DispatchQueue.concurrentPerform(iterations: grid.rows * grid.columns) { block in Denormals.inMode(flushed) {
        let i = block / grid.columns, j = block % grid.columns
        let r0 = grid.rowStart(i, m: m), r1 = grid.rowStart(i + 1, m: m)
        let c0 = grid.columnStart(j, n: n), c1 = grid.columnStart(j + 1, n: n)
        // Rows r0..<r1 of op(A) and columns c0..<c1 of op(B), wherever they lie in memory.
        let aBlock = transA ? a + r0 : a + r0 * lda
        let bBlock = transB ? b + c0 * ldb : b + c0
        sgemmOneThread(transA: transA, transB: transB, m: r1 - r0, n: c1 - c0, k: k, alpha: alpha, a: aBlock, lda: lda,
                       b: bBlock, ldb: ldb, beta: beta, c: c + r0 * ldc + c0, ldc: ldc)
    } }
}

/// One OpenBLAS call, on the calling thread (OpenBLAS is kept at one thread, `blasSingleThreaded`).
@inline(__always)
func sgemmOneThread(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
                    b: UnsafePointer<Float>, ldb: Int, beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
    _ = blasSingleThreaded
    cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
}

/// out = inp · weightᵀ + bias.
/// out is (N,OUT), inp is (N,IN), weight is (OUT,IN) (Hugging Face layout), bias is (OUT) or nil.
public func linearForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                          _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                          n: Int, inFeatures: Int, outFeatures: Int) {
    if let bias {
        profiled(.bias, .forward) {
            parallelFor(n, grain: 64) { rows in
                for r in rows { (out + r * outFeatures).update(from: bias, count: outFeatures) }
            }
        }
    }
    sgemm(transB: true, m: n, n: outFeatures, k: inFeatures, a: inp, lda: inFeatures,
          b: weight, ldb: inFeatures, beta: bias == nil ? 0 : 1, c: out, ldc: outFeatures)
}

/// out (N,OUT) = residual (N,OUT) + inp · weightᵀ + bias: the residual and the bias are written in one pass,
/// then the GEMM adds the product onto them (β = 1), so the product never makes a pass of its own.
/// out may alias residual; bias may be nil.
public func linearForwardAdding(_ out: UnsafeMutablePointer<Float>, residual: UnsafePointer<Float>,
                                _ inp: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                                n: Int, inFeatures: Int, outFeatures: Int) {
    biasResidualForward(out, residual, bias, n: n, c: outFeatures)
    sgemm(transB: true, m: n, n: outFeatures, k: inFeatures, a: inp, lda: inFeatures,
          b: weight, ldb: inFeatures, beta: 1, c: out, ldc: outFeatures)
}

/// out (N,C) = residual (N,C) + bias (C) per row (bias nil: a copy, nothing when out is residual).
/// out may alias residual. Its backward passes dout to the residual and Σ_rows dout to the bias.
public func biasResidualForward(_ out: UnsafeMutablePointer<Float>, _ residual: UnsafePointer<Float>,
                                _ bias: UnsafePointer<Float>?, n: Int, c: Int) {
    guard let bias else {
        if UnsafePointer(out) != residual { copyFloats(out, residual, count: n * c) }
        return
    }
    profiled(.bias, .forward) {
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let o = out + r * c, x = residual + r * c
                var i = 0
                while i + 8 <= c { store8(o + i, load8(x + i) + load8(bias + i)); i += 8 }
                while i < c { o[i] = x[i] + bias[i]; i += 1 }
            }
        }
    }
}

/// Backward of `out = inp · weightᵀ + bias`:
/// dinp (N,IN) += dout · weight (or = with `accumulate` false: dinp is written, not read);
/// dweight (OUT,IN) += doutᵀ · inp; dbias (OUT) += Σ_rows dout.
/// Each gradient is computed only when its pointer is given.
public func linearBackward(dinp: UnsafeMutablePointer<Float>?, dweight: UnsafeMutablePointer<Float>?,
                           dbias: UnsafeMutablePointer<Float>?,
                           _ dout: UnsafePointer<Float>, _ inp: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                           n: Int, inFeatures: Int, outFeatures: Int, accumulate: Bool = true) {
    withProfilePhase(.backward) {
        if let dinp {
            sgemm(m: n, n: inFeatures, k: outFeatures, a: dout, lda: outFeatures,
                  b: weight, ldb: inFeatures, beta: accumulate ? 1 : 0, c: dinp, ldc: inFeatures)
        }
        if let dweight {
            sgemm(transA: true, m: outFeatures, n: inFeatures, k: n, a: dout, lda: outFeatures,
                  b: inp, ldb: inFeatures, beta: 1, c: dweight, ldc: inFeatures)
        }
    }
    if let dbias {
        profiled(.bias, .backward) {
            for r in 0..<n {
                let row = dout + r * outFeatures
                for o in 0..<outFeatures { dbias[o] += row[o] }
            }
        }
    }
}
