import Kernels

// Array-level conveniences over the Kernels layer for the method's small dense layers (the alignment
// MLP and the head); the arithmetic is Kernels' `linearForward` / `linearBackward` / cross-entropy.

/// out (N, OUT) = inp (N, IN) · weightᵀ + bias; weight is (OUT, IN).
func linear(_ inp: [Float], _ weight: [Float], _ bias: [Float]?, n: Int, inFeatures: Int, outFeatures: Int) -> [Float] {
    precondition(inp.count == n * inFeatures && weight.count == outFeatures * inFeatures && (bias?.count ?? outFeatures) == outFeatures)
    var out = [Float](repeating: 0, count: n * outFeatures)
    out.withUnsafeMutableBufferPointer { o in
        inp.withUnsafeBufferPointer { i in
            weight.withUnsafeBufferPointer { w in
                if let bias {
                    bias.withUnsafeBufferPointer { linearForward(o.baseAddress!, i.baseAddress!, w.baseAddress!, $0.baseAddress!, n: n, inFeatures: inFeatures, outFeatures: outFeatures) }
                } else {
                    linearForward(o.baseAddress!, i.baseAddress!, w.baseAddress!, nil, n: n, inFeatures: inFeatures, outFeatures: outFeatures)
                }
            }
        }
    }
    return out
}

/// Backward of `linear`, accumulating into the given gradients:
/// dInp (N, IN) += dOut · weight; dWeight (OUT, IN) += dOutᵀ · inp; dBias (OUT) += Σ rows of dOut.
func linearGradients(_ dOut: [Float], _ inp: [Float], _ weight: [Float], n: Int, inFeatures: Int, outFeatures: Int,
                     dInp: UnsafeMutablePointer<Float>?, dWeight: inout [Float], dBias: UnsafeMutablePointer<Float>?) {
    precondition(dOut.count == n * outFeatures && inp.count == n * inFeatures && dWeight.count == weight.count)
    dOut.withUnsafeBufferPointer { g in
        inp.withUnsafeBufferPointer { i in
            weight.withUnsafeBufferPointer { w in
                dWeight.withUnsafeMutableBufferPointer { dw in
                    linearBackward(dinp: dInp, dweight: dw.baseAddress!, dbias: dBias, g.baseAddress!, i.baseAddress!, w.baseAddress!,
                                   n: n, inFeatures: inFeatures, outFeatures: outFeatures)
                }
            }
        }
    }
}

/// Label-smoothing cross-entropy of logits (N, C) against targets (N) (PyTorch's `label_smoothing`, equal
/// to the reference's `LabelSmoothingCrossEntropy`), for a batch that is part of a logical batch of
/// `logicalBatch` rows: returns the loss SUMMED over the N rows and writes dLogits (N, C) of the logical
/// batch's mean loss, (softmax − ((1−ε)·onehot + ε/C)) / logicalBatch.
func smoothedCrossEntropy(_ logits: [Float], targets: [Int], classCount c: Int, smoothing: Float, logicalBatch: Int,
                          dLogits: inout [Float]) -> Double {
    let n = targets.count
    precondition(logits.count == n * c && dLogits.count == n * c && logicalBatch >= n)
    let mean = dLogits.withUnsafeMutableBufferPointer { d in
        logits.withUnsafeBufferPointer { crossEntropyForwardBackward(dlogits: d.baseAddress!, $0.baseAddress!, labels: targets, n: n, c: c, smoothing: smoothing) }
    }
    if logicalBatch != n {
        let rescale = Float(n) / Float(logicalBatch)
        for i in dLogits.indices { dLogits[i] *= rescale }
    }
    return Double(mean) * Double(n)
}
