import CImageSupport
import Foundation

/// An 8-bit RGB image, rows top to bottom, pixels interleaved: pixels is (height, width, 3).
public struct RGBImage: Sendable, Equatable {
    public var width: Int
    public var height: Int
    public var pixels: [UInt8]

    public init(width: Int, height: Int, pixels: [UInt8]) {
        precondition(width >= 0 && height >= 0 && pixels.count == width * height * 3, "RGBImage: \(width)×\(height) needs \(width * height * 3) bytes, got \(pixels.count)")
        self.width = width
        self.height = height
        self.pixels = pixels
    }

    /// A black image.
    public init(width: Int, height: Int) {
        self.init(width: width, height: height, pixels: [UInt8](repeating: 0, count: width * height * 3))
    }
}

/// Why an image file could not be read. Every case names the file; the job records the image as
/// unreadable and goes on.
public enum ImageError: Error, Equatable, Sendable, CustomStringConvertible {
    case notFound(path: String)
    case unreadable(path: String, reason: String)
    case empty(path: String)
    case unsupportedFormat(path: String)
    case truncated(path: String, detail: String)
    case corrupt(path: String, detail: String)
    case tooLarge(path: String, pixels: Int, limit: Int)
    case outOfMemory(path: String)

    /// A short stable code, e.g. for a database column.
    public var code: String {
        switch self {
        case .notFound: return "not_found"
        case .unreadable: return "unreadable"
        case .empty: return "empty"
        case .unsupportedFormat: return "unsupported_format"
        case .truncated: return "truncated"
        case .corrupt: return "corrupt"
        case .tooLarge: return "too_large"
        case .outOfMemory: return "out_of_memory"
        }
    }

    public var path: String {
        switch self {
        case .notFound(let p), .unreadable(let p, _), .empty(let p), .unsupportedFormat(let p),
             .truncated(let p, _), .corrupt(let p, _), .tooLarge(let p, _, _), .outOfMemory(let p):
            return p
        }
    }

    public var description: String {
        switch self {
        case .notFound(let p): return "\(p): no such file"
        case .unreadable(let p, let reason): return "\(p): cannot read: \(reason)"
        case .empty(let p): return "\(p): empty file"
        case .unsupportedFormat(let p): return "\(p): not a JPEG or PNG image"
        case .truncated(let p, let detail): return "\(p): truncated image (\(detail))"
        case .corrupt(let p, let detail): return "\(p): corrupt image (\(detail))"
        case .tooLarge(let p, let pixels, let limit): return "\(p): \(pixels) pixels exceeds the limit of \(limit)"
        case .outOfMemory(let p): return "\(p): out of memory while decoding"
        }
    }
}

public struct DecodeOptions: Sendable, Equatable {
    /// Rotate/flip by the EXIF orientation tag as Pillow's ImageOps.exif_transpose. Off in the reference pipeline.
    public var applyEXIFOrientation: Bool
    /// Files with more pixels fail with .tooLarge. Default: Pillow's decompression-bomb error threshold
    /// (2 × Image.MAX_IMAGE_PIXELS).
    public var maxPixels: Int
    /// Fast path, off (nil) by default: a JPEG whose shorter side is at least 2×, 4× or 8× this value is
    /// decoded at 1/2, 1/4 or 1/8 DCT scale, keeping the shorter side ≥ this value. Not Pillow-exact.
    public var jpegReducedScaleMinSide: Int?

    public static let pillowMaxPixels = 2 * 89_478_485

    public init(applyEXIFOrientation: Bool = false, maxPixels: Int = DecodeOptions.pillowMaxPixels, jpegReducedScaleMinSide: Int? = nil) {
        self.applyEXIFOrientation = applyEXIFOrientation
        self.maxPixels = maxPixels
        self.jpegReducedScaleMinSide = jpegReducedScaleMinSide
    }
}

/// Reads and decodes a JPEG or PNG file (recognised by content) to RGB as Pillow's `Image.open(path).convert("RGB")`.
public func decodeImage(at url: URL, options: DecodeOptions = DecodeOptions()) throws -> RGBImage {
    try decodeImage(at: ImageFile(url: url), options: options)
}

/// Reads and decodes the file at `file`'s bytes (names need not be valid UTF-8).
public func decodeImage(at file: ImageFile, options: DecodeOptions = DecodeOptions()) throws -> RGBImage {
    let bytes = try readFile(file)
    return try decodeImage(bytes, name: file.displayPath, options: options)
}

/// Decodes JPEG or PNG bytes; `name` is used in errors.
public func decodeImage(_ bytes: [UInt8], name: String, options: DecodeOptions = DecodeOptions()) throws -> RGBImage {
    if bytes.isEmpty { throw ImageError.empty(path: name) }
    let isJPEG = bytes.count >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF
    let isPNG = bytes.count >= 8 && bytes[0..<8].elementsEqual([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
    guard isJPEG || isPNG else { throw ImageError.unsupportedFormat(path: name) }
    let limit = UInt64(max(0, options.maxPixels))

    var info = nolad_img_info()
    func check(_ status: nolad_img_status) throws {
        let message = withUnsafeBytes(of: info.message) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        switch status {
        case NOLAD_IMG_OK: return
        case NOLAD_IMG_TRUNCATED: throw ImageError.truncated(path: name, detail: message)
        case NOLAD_IMG_TOO_LARGE:
            throw ImageError.tooLarge(path: name, pixels: Int(info.source_width) * Int(info.source_height), limit: options.maxPixels)
        case NOLAD_IMG_NO_MEMORY: throw ImageError.outOfMemory(path: name)
        default: throw ImageError.corrupt(path: name, detail: message)
        }
    }

    var image: RGBImage
    if isJPEG {
        // Header pass: size, orientation, limit; then the DCT scale for the optional fast path.
        try bytes.withUnsafeBufferPointer { try check(nolad_jpeg_decode($0.baseAddress, $0.count, 1, limit, nil, &info)) }
        var denom: Int32 = 1
        if let minSide = options.jpegReducedScaleMinSide, minSide > 0 {
            let short = Int(min(info.source_width, info.source_height))
            while denom < 8 && short / Int(denom * 2) >= minSide { denom *= 2 }
            if denom > 1 {
                try bytes.withUnsafeBufferPointer { try check(nolad_jpeg_decode($0.baseAddress, $0.count, denom, limit, nil, &info)) }
            }
        }
        let width = Int(info.width), height = Int(info.height)
        var status = NOLAD_IMG_OK
        let pixels = [UInt8](unsafeUninitializedCapacity: width * height * 3) { buffer, count in
            status = bytes.withUnsafeBufferPointer { nolad_jpeg_decode($0.baseAddress, $0.count, denom, limit, buffer.baseAddress, &info) }
            count = width * height * 3
        }
        try check(status)
        image = RGBImage(width: width, height: height, pixels: pixels)
    } else {
        try bytes.withUnsafeBufferPointer { try check(nolad_png_decode($0.baseAddress, $0.count, limit, nil, &info)) }
        let width = Int(info.width), height = Int(info.height)
        var status = NOLAD_IMG_OK
        let pixels = [UInt8](unsafeUninitializedCapacity: width * height * 3) { buffer, count in
            status = bytes.withUnsafeBufferPointer { nolad_png_decode($0.baseAddress, $0.count, limit, buffer.baseAddress, &info) }
            count = width * height * 3
        }
        try check(status)
        image = RGBImage(width: width, height: height, pixels: pixels)
    }
    if options.applyEXIFOrientation && info.orientation > 1 {
        image = applyOrientation(image, Int(info.orientation))
    }
    return image
}

/// Reads a whole file; missing files and I/O failures become ImageError naming the path.
func readFile(_ file: ImageFile) throws -> [UInt8] {
    let path = file.displayPath
    let fd = file.withCString { open($0, O_RDONLY | O_CLOEXEC) }
    if fd < 0 {
        let code = errno
        if code == ENOENT || code == ENOTDIR { throw ImageError.notFound(path: path) }
        throw ImageError.unreadable(path: path, reason: String(cString: strerror(code)))
    }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw ImageError.unreadable(path: path, reason: String(cString: strerror(errno))) }
    guard (st.st_mode & S_IFMT) == S_IFREG else { throw ImageError.unreadable(path: path, reason: "not a regular file") }
    let size = Int(st.st_size)
    var failure: Int32 = 0
    let bytes = [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
        var done = 0
        while done < size {
            let n = read(fd, buffer.baseAddress! + done, size - done)
            if n < 0 {
                if errno == EINTR { continue }
                failure = errno
                break
            }
            if n == 0 { break }
            done += n
        }
        count = done
    }
    if failure != 0 { throw ImageError.unreadable(path: path, reason: String(cString: strerror(failure))) }
    return bytes
}

/// Pillow's ImageOps.exif_transpose for orientation 2...8.
func applyOrientation(_ image: RGBImage, _ orientation: Int) -> RGBImage {
    switch orientation {
    case 2: return flipHorizontal(image)
    case 3: return rotate180(image)
    case 4: return flipVertical(image)
    case 5: return transpose(image)
    case 6: return rotate270(image)
    case 7: return transverse(image)
    case 8: return rotate90(image)
    default: return image
    }
}

/// Output pixel (x, y) takes input pixel map(x, y); output size width × height.
private func remap(_ image: RGBImage, width: Int, height: Int, _ map: (Int, Int) -> (Int, Int)) -> RGBImage {
    var out = [UInt8](repeating: 0, count: width * height * 3)
    image.pixels.withUnsafeBufferPointer { src in
        out.withUnsafeMutableBufferPointer { dst in
            for y in 0..<height {
                for x in 0..<width {
                    let (sx, sy) = map(x, y)
                    let s = (sy * image.width + sx) * 3, d = (y * width + x) * 3
                    dst[d] = src[s]; dst[d + 1] = src[s + 1]; dst[d + 2] = src[s + 2]
                }
            }
        }
    }
    return RGBImage(width: width, height: height, pixels: out)
}

public func flipHorizontal(_ image: RGBImage) -> RGBImage {
    remap(image, width: image.width, height: image.height) { x, y in (image.width - 1 - x, y) }
}

func flipVertical(_ image: RGBImage) -> RGBImage {
    remap(image, width: image.width, height: image.height) { x, y in (x, image.height - 1 - y) }
}

func rotate180(_ image: RGBImage) -> RGBImage {
    remap(image, width: image.width, height: image.height) { x, y in (image.width - 1 - x, image.height - 1 - y) }
}

/// Counter-clockwise by 90° (Pillow's ROTATE_90).
func rotate90(_ image: RGBImage) -> RGBImage {
    remap(image, width: image.height, height: image.width) { x, y in (image.width - 1 - y, x) }
}

/// Counter-clockwise by 270° (Pillow's ROTATE_270).
func rotate270(_ image: RGBImage) -> RGBImage {
    remap(image, width: image.height, height: image.width) { x, y in (y, image.height - 1 - x) }
}

func transpose(_ image: RGBImage) -> RGBImage {
    remap(image, width: image.height, height: image.width) { x, y in (y, x) }
}

func transverse(_ image: RGBImage) -> RGBImage {
    remap(image, width: image.height, height: image.width) { x, y in (image.width - 1 - y, image.height - 1 - x) }
}
