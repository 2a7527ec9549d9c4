import Foundation

/// Decodes `files` and writes their weak views into one (files.count, 3, crop, crop) Float32 tensor,
/// using `threads` workers. An unreadable file leaves its slot zero and is reported in `errors` (by
/// index); the batch goes on.
public func weakViewBatch(_ files: [URL], config: WeakViewConfig = .clip, options: DecodeOptions = DecodeOptions(),
                          threads: Int = 2) -> (tensor: [Float], errors: [Int: ImageError]) {
    weakViewBatch(files.map(ImageFile.init(url:)), config: config, options: options, threads: threads)
}

/// `weakViewBatch` for files named by their bytes (names need not be valid UTF-8).
public func weakViewBatch(_ files: [ImageFile], config: WeakViewConfig = .clip, options: DecodeOptions = DecodeOptions(),
                          threads: Int = 2) -> (tensor: [Float], errors: [Int: ImageError]) {
    precondition(threads >= 1, "weakViewBatch: threads must be at least 1")
    let slot = 3 * config.crop * config.crop
    var tensor = [Float](repeating: 0, count: files.count * slot)
    var errors: [Int: ImageError] = [:]
    let lock = NSLock()
    var next = 0
    tensor.withUnsafeMutableBufferPointer { buffer in
        let base = buffer.baseAddress!
        DispatchQueue.concurrentPerform(iterations: min(threads, max(files.count, 1))) { _ in
            while true {
                lock.lock()
                let i = next
                next += 1
                lock.unlock()
                if i >= files.count { return }
                do {
                    let image = try decodeImage(at: files[i], options: options)
                    let view = weakViewCrop(image, resize: config.resize, crop: config.crop)
                    normalizeCHW(view, mean: config.mean, std: config.std, into: base + i * slot)
                } catch let error as ImageError {
                    lock.lock()
                    errors[i] = error
                    lock.unlock()
                } catch {
                    preconditionFailure("decodeImage threw a non-ImageError: \(error)")
                }
            }
        }
    }
    return (tensor, errors)
}
