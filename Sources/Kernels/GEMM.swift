import COpenBLAS

/// C (m,n) = alpha · op(A) · op(B) + beta · C, row-major; op(A) is (m,k), op(B) is (k,n).
@inline(__always)
public func sgemm(transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int,
                  alpha: Float = 1, a: UnsafePointer<Float>, lda: Int,
                  b: UnsafePointer<Float>, ldb: Int,
                  beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int) {
    cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
}

/// out = inp · weightᵀ + bias.
/// out is (N,OUT), inp is (N,IN), weight is (OUT,IN) (Hugging Face layout), bias is (OUT) or nil.
public func linearForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                          _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                          n: Int, inFeatures: Int, outFeatures: Int) {
    if let bias {
        parallelFor(n, grain: 64) { rows in
            for r in rows { (out + r * outFeatures).update(from: bias, count: outFeatures) }
        }
    }
    sgemm(transB: true, m: n, n: outFeatures, k: inFeatures, a: inp, lda: inFeatures,
          b: weight, ldb: inFeatures, beta: bias == nil ? 0 : 1, c: out, ldc: outFeatures)
}

/// Backward of `out = inp · weightᵀ + bias`, accumulating:
/// dinp (N,IN) += dout · weight; dweight (OUT,IN) += doutᵀ · inp; dbias (OUT) += Σ_rows dout.
/// Each gradient is computed only when its pointer is given.
public func linearBackward(dinp: UnsafeMutablePointer<Float>?, dweight: UnsafeMutablePointer<Float>?,
                           dbias: UnsafeMutablePointer<Float>?,
                           _ dout: UnsafePointer<Float>, _ inp: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                           n: Int, inFeatures: Int, outFeatures: Int) {
    if let dinp {
        sgemm(m: n, n: inFeatures, k: outFeatures, a: dout, lda: outFeatures,
              b: weight, ldb: inFeatures, beta: 1, c: dinp, ldc: inFeatures)
    }
    if let dweight {
        sgemm(transA: true, m: outFeatures, n: inFeatures, k: n, a: dout, lda: outFeatures,
              b: inp, ldb: inFeatures, beta: 1, c: dweight, ldc: inFeatures)
    }
    if let dbias {
        for r in 0..<n {
            let row = dout + r * outFeatures
            for o in 0..<outFeatures { dbias[o] += row[o] }
        }
    }
}
