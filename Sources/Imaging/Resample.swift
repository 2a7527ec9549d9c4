import Foundation

/// Pillow's separable resampling filters (libImaging/Resample.c).
public enum ResampleFilter: Sendable {
    case bilinear
    case bicubic

    var support: Double {
        switch self {
        case .bilinear: return 1.0
        case .bicubic: return 2.0
        }
    }

    func weight(_ x: Double) -> Double {
        let x = abs(x)
        switch self {
        case .bilinear:
            return x < 1.0 ? 1.0 - x : 0.0
        case .bicubic:
            let a = -0.5
            if x < 1.0 { return ((a + 2.0) * x - (a + 3.0)) * x * x + 1 }
            if x < 2.0 { return (((x - 5) * x + 8) * x - 4) * a }
            return 0.0
        }
    }
}

/// Fixed-point fraction bits of Pillow's 8-bit coefficients: 32 - 8 - 2.
let precisionBits = 22

/// One axis of a Pillow resample: for every output index, the first input index and the fixed-point
/// weights of its taps. Only outputs in `range` are computed (each depends only on its own index, so a
/// crop of the full resample is bit-identical).
struct ResampleAxis {
    var first: [Int]       // (count,)
    var taps: [Int]        // (count,)
    var weights: [Int32]   // (count, kernelSize), zero past taps
    var kernelSize: Int    // Pillow's ceil(support) * 2 + 1, rounded up to a multiple of 8 for SIMD8 loads

    init(inSize: Int, outSize: Int, range: Range<Int>, filter: ResampleFilter) {
        // Pillow: box = (0, inSize) as float, scale = (in1 - in0) / outSize, support widened on downscale.
        let scale = Double(Float(inSize)) / Double(outSize)
        let filterScale = max(scale, 1.0)
        let support = filter.support * filterScale
        kernelSize = (Int(ceil(support)) * 2 + 1 + 7) / 8 * 8
        first = []
        taps = []
        weights = [Int32](repeating: 0, count: range.count * kernelSize)
        first.reserveCapacity(range.count)
        taps.reserveCapacity(range.count)
        let invFilterScale = 1.0 / filterScale
        var k = [Double](repeating: 0, count: kernelSize)
        for (row, xx) in range.enumerated() {
            let center = (Double(xx) + 0.5) * scale
            var xmin = Int(center - support + 0.5)  // C (int) truncation
            if xmin < 0 { xmin = 0 }
            var xmax = Int(center + support + 0.5)
            if xmax > inSize { xmax = inSize }
            xmax -= xmin
            var ww = 0.0
            for x in 0..<xmax {
                let w = filter.weight((Double(x + xmin) - center + 0.5) * invFilterScale)
                k[x] = w
                ww += w
            }
            for x in 0..<xmax {
                let w = ww != 0.0 ? k[x] / ww : k[x]
                // Pillow's normalize_coeffs_8bpc: round half away from zero.
                weights[row * kernelSize + x] = w < 0 ? Int32(-0.5 + w * Double(1 << precisionBits)) : Int32(0.5 + w * Double(1 << precisionBits))
            }
            first.append(xmin)
            taps.append(xmax)
        }
    }
}

@inline(__always) func clip8(_ v: Int32) -> UInt8 {
    let s = v >> Int32(precisionBits)
    return s < 0 ? 0 : s > 255 ? 255 : UInt8(s)
}

/// Whether Pillow (13 and later, libImaging/Resample.c ImagingResampleInner) runs the horizontal pass
/// first: it runs the vertical pass first when the height shrinks by more than twice as many pixels as
/// the width does, `(inH - outH) > 0 && (inH - outH) > (inW - outW) * 2`. Each pass rounds to uint8, so
/// the order changes the result. Pillow 12 and earlier always ran the horizontal pass first.
func horizontalPassFirst(inWidth: Int, inHeight: Int, outWidth: Int, outHeight: Int) -> Bool {
    let dy = inHeight - outHeight, dx = inWidth - outWidth
    return !(dy > 0 && dy > dx * 2)
}

/// Pillow's `Image.resize((width, height), filter)` for an RGB image: two separable passes, each
/// rounding and clipping to uint8, in Pillow's order (see `horizontalPassFirst`). `crop` (in output
/// coordinates) limits the work to a window of the result; the pixels are bit-identical to cropping the
/// full resize, because every output pixel of a pass depends only on its own index.
public func resample(_ image: RGBImage, width: Int, height: Int, filter: ResampleFilter,
                     crop: (x: Int, y: Int, width: Int, height: Int)? = nil) -> RGBImage {
    precondition(width > 0 && height > 0 && image.width > 0 && image.height > 0, "resample: empty image or size")
    let window = crop ?? (0, 0, width, height)
    precondition(window.x >= 0 && window.y >= 0 && window.x + window.width <= width && window.y + window.height <= height,
                 "resample: crop \(window) outside \(width)×\(height)")
    if width == image.width && height == image.height {
        return cropImage(image, left: window.x, top: window.y, width: window.width, height: window.height)
    }
    let needHorizontal = width != image.width
    let needVertical = height != image.height
    let vertical = needVertical ? ResampleAxis(inSize: image.height, outSize: height, range: window.y..<(window.y + window.height), filter: filter) : nil
    let horizontal = needHorizontal ? ResampleAxis(inSize: image.width, outSize: width, range: window.x..<(window.x + window.width), filter: filter) : nil
    // Source rows the vertical pass reads and source columns the horizontal pass reads.
    let rows = vertical.map { $0.first[0]..<($0.first[window.height - 1] + $0.taps[window.height - 1]) } ?? window.y..<(window.y + window.height)
    let columns = horizontal.map { $0.first[0]..<($0.first[window.width - 1] + $0.taps[window.width - 1]) } ?? window.x..<(window.x + window.width)

    if horizontalPassFirst(inWidth: image.width, inHeight: image.height, outWidth: width, outHeight: height) {
        // (rows, window.width) after the horizontal pass, then (window.height, window.width).
        let temp = horizontal.map { horizontalPass(image, rows: rows, columns: 0..<image.width, axis: $0) }
            ?? cropImage(image, left: window.x, top: rows.lowerBound, width: window.width, height: rows.count)
        guard let vertical else { return temp }
        return verticalPass(temp, rowOffset: rows.lowerBound, axis: vertical)
    } else {
        // Pillow's vertical-first branch implies the height shrinks, so the vertical pass is needed:
        // (window.height, columns) after it, then (window.height, window.width).
        let source = columns.count == image.width && rows.count == image.height
            ? image : cropImage(image, left: columns.lowerBound, top: rows.lowerBound, width: columns.count, height: rows.count)
        let temp = verticalPass(source, rowOffset: rows.lowerBound, axis: vertical!)
        guard let horizontal else { return temp }
        return horizontalPass(temp, rows: 0..<temp.height, columns: columns, axis: horizontal)
    }
}

/// The horizontal pass over `rows` of `image`, whose columns are the source columns `columns`
/// (`axis.first` is in source coordinates): (rows.count, axis outputs) pixels.
private func horizontalPass(_ image: RGBImage, rows: Range<Int>, columns: Range<Int>, axis: ResampleAxis) -> RGBImage {
    precondition(columns.count == image.width && rows.upperBound <= image.height, "horizontalPass: bad source window")
    let outWidth = axis.first.count
    var temp = [UInt8](repeating: 0, count: rows.count * outWidth * 3)
    let ks = axis.kernelSize
    // Each row is split into three Int32 planes, zero-padded by ks so SIMD8 loads past the last
    // tap stay in bounds (their weights are zero). Integer sums: the order of taps does not matter.
    let plane = image.width + ks
    let planes = UnsafeMutablePointer<Int32>.allocate(capacity: 3 * plane)
    planes.initialize(repeating: 0, count: 3 * plane)
    defer { planes.deallocate() }
    let r = planes, g = planes + plane, b = planes + 2 * plane
    image.pixels.withUnsafeBufferPointer { src in
        temp.withUnsafeMutableBufferPointer { dst in
            axis.weights.withUnsafeBufferPointer { kk in
                for (y, sourceRow) in rows.enumerated() {
                    let lineIn = src.baseAddress! + sourceRow * image.width * 3
                    let lineOut = dst.baseAddress! + y * outWidth * 3
                    for x in 0..<image.width {
                        r[x] = Int32(lineIn[x * 3])
                        g[x] = Int32(lineIn[x * 3 + 1])
                        b[x] = Int32(lineIn[x * 3 + 2])
                    }
                    for xx in 0..<outWidth {
                        let xmin = axis.first[xx] - columns.lowerBound, n = axis.taps[xx]
                        let k = kk.baseAddress! + xx * ks
                        var s0 = SIMD8<Int32>(), s1 = s0, s2 = s0
                        var t = 0
                        while t < n {
                            let w = UnsafeRawPointer(k + t).loadUnaligned(as: SIMD8<Int32>.self)
                            s0 &+= w &* UnsafeRawPointer(r + xmin + t).loadUnaligned(as: SIMD8<Int32>.self)
                            s1 &+= w &* UnsafeRawPointer(g + xmin + t).loadUnaligned(as: SIMD8<Int32>.self)
                            s2 &+= w &* UnsafeRawPointer(b + xmin + t).loadUnaligned(as: SIMD8<Int32>.self)
                            t += 8
                        }
                        let half: Int32 = 1 << Int32(precisionBits - 1)
                        lineOut[xx * 3] = clip8(s0.wrappedSum() &+ half)
                        lineOut[xx * 3 + 1] = clip8(s1.wrappedSum() &+ half)
                        lineOut[xx * 3 + 2] = clip8(s2.wrappedSum() &+ half)
                    }
                }
            }
        }
    }
    return RGBImage(width: outWidth, height: rows.count, pixels: temp)
}

/// The vertical pass over all columns of `image`, whose row 0 is source row `rowOffset`
/// (`axis.first` is in source coordinates): (axis outputs, image.width) pixels.
private func verticalPass(_ image: RGBImage, rowOffset: Int, axis: ResampleAxis) -> RGBImage {
    let outHeight = axis.first.count
    let rowLength = image.width * 3
    var out = [UInt8](repeating: 0, count: outHeight * rowLength)
    let ks = axis.kernelSize
    image.pixels.withUnsafeBufferPointer { src in
        out.withUnsafeMutableBufferPointer { dst in
            axis.weights.withUnsafeBufferPointer { kk in
                var acc = [Int32](repeating: 0, count: rowLength)
                acc.withUnsafeMutableBufferPointer { acc in
                    for yy in 0..<outHeight {
                        let ymin = axis.first[yy] - rowOffset, n = axis.taps[yy]
                        precondition(ymin >= 0 && ymin + n <= image.height, "verticalPass: rows outside the source window")
                        let k = kk.baseAddress! + yy * ks
                        for i in 0..<rowLength { acc[i] = 1 << Int32(precisionBits - 1) }
                        for y in 0..<n {
                            let w = k[y]
                            let line = src.baseAddress! + (ymin + y) * rowLength
                            for i in 0..<rowLength { acc[i] &+= Int32(line[i]) &* w }
                        }
                        let lineOut = dst.baseAddress! + yy * rowLength
                        for i in 0..<rowLength { lineOut[i] = clip8(acc[i]) }
                    }
                }
            }
        }
    }
    return RGBImage(width: image.width, height: outHeight, pixels: out)
}

/// Pillow's resize with its bicubic filter.
public func resizeBicubic(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
    resample(image, width: width, height: height, filter: .bicubic)
}

/// Pillow's `Image.crop((left, top, left + width, top + height))`; pixels outside the image are black.
public func cropImage(_ image: RGBImage, left: Int, top: Int, width: Int, height: Int) -> RGBImage {
    precondition(width >= 0 && height >= 0, "cropImage: negative size")
    var out = [UInt8](repeating: 0, count: width * height * 3)
    let x0 = max(left, 0), x1 = min(left + width, image.width)
    if x1 > x0 {
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for y in max(top, 0)..<max(max(top, 0), min(top + height, image.height)) {
                    let s = src.baseAddress! + (y * image.width + x0) * 3
                    let d = dst.baseAddress! + ((y - top) * width + (x0 - left)) * 3
                    d.update(from: s, count: (x1 - x0) * 3)
                }
            }
        }
    }
    return RGBImage(width: width, height: height, pixels: out)
}
