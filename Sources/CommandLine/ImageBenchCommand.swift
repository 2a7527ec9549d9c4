import ArgumentParser
import Daemon
import Foundation
import Imaging

/// `nolad bench-images`: decode + weak view (uint8 crop and normalised tensor) of every image in a
/// folder with N threads; prints images/s. reference/bench_pillow.py measures Pillow + torchvision the same way.
public struct ImageBenchCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "bench-images",
        abstract: "Measure decode + weak-view throughput (images/s) on a folder of JPEG/PNG files."
    )

    @Option(help: "Folder of images (not recursive).")
    var folder: String

    @Option(help: "Worker threads.")
    var threads: Int = 1

    @Option(help: "Weak-view resize (shorter side).")
    var resize: Int = 224

    @Option(help: "Weak-view centre crop.")
    var crop: Int = 224

    @Option(help: "Passes over the folder (the first one also warms the page cache).")
    var repeats: Int = 2

    @Flag(help: "Decode large JPEGs at a reduced DCT scale (fast path, not Pillow-exact).")
    var reducedDCT = false

    @Flag(help: "Time decode + NoLA's strong view (random resized crop, flip, jitter, perspective, jitter, blur) instead of the weak view.")
    var strong = false

    @Flag(help: "With --strong: no ColorJitter (the job parameter colour_jitter: false, as the demo runs).")
    var noColourJitter = false

    @Flag(help: "Instead of timing, print per file a checksum of the decoded RGB and of the uint8 weak view (compare with bench_pillow.py --checksums).")
    var checksums = false

    @Flag(help: "Instead of timing, measure how far the reduced-DCT fast path's uint8 weak views are from the exact ones.")
    var measureReducedDCT = false

    public init() {}

    public func run() throws {
        guard threads >= 1, repeats >= 1 else { throw ValidationError("--threads and --repeats must be at least 1") }
        let root = URL(fileURLWithPath: folder)
        let names = try FileManager.default.contentsOfDirectory(atPath: folder).sorted()
        let files = names.map { root.appendingPathComponent($0) }.filter {
            (try? $0.resourceValues(forKeys: [.isRegularFileKey]).isRegularFile) == true
        }
        guard !files.isEmpty else { throw ValidationError("no files in \(folder)") }
        let options = DecodeOptions(jpegReducedScaleMinSide: reducedDCT ? resize : nil)
        let config = WeakViewConfig(resize: resize, crop: crop, mean: WeakViewConfig.clipMean, std: WeakViewConfig.clipStd)
        if checksums {
            for file in files {
                do {
                    let image = try decodeImage(at: file)
                    let view = weakViewCrop(image, resize: resize, crop: crop)
                    print("\(file.lastPathComponent) \(image.width)x\(image.height) \(weightedChecksum(image.pixels)) \(weightedChecksum(view.pixels))")
                } catch {
                    print("\(file.lastPathComponent) error")
                }
            }
            return
        }
        if measureReducedDCT {
            var total = 0.0, worst = 0, reduced = 0, bytes = 0
            for file in files {
                guard let exact = try? decodeImage(at: file),
                      let fast = try? decodeImage(at: file, options: DecodeOptions(jpegReducedScaleMinSide: resize)) else { continue }
                if fast.width == exact.width { continue }
                reduced += 1
                let a = weakViewCrop(exact, resize: resize, crop: crop).pixels
                let b = weakViewCrop(fast, resize: resize, crop: crop).pixels
                for i in 0..<a.count {
                    let d = abs(Int(a[i]) - Int(b[i]))
                    total += Double(d)
                    worst = max(worst, d)
                }
                bytes += a.count
            }
            print(String(format: "reduced DCT scale: %d of %d images reduced; weak-view uint8 mean |Δ| = %.3f, max |Δ| = %d",
                         reduced, files.count, bytes > 0 ? total / Double(bytes) : 0, worst))
            return
        }
        var strongConfig = StrongViewConfig()
        if noColourJitter {
            strongConfig.jitterProbability = 0
            strongConfig.secondJitter = nil
        }
        print("bench-images: \(files.count) files in \(folder), \(threads) thread(s), \(strong ? "strong view 224\(noColourJitter ? " without colour jitter" : "")" : "resize \(resize) crop \(crop)")\(reducedDCT ? ", reduced DCT scale" : "")")
        for pass in 1...repeats {
            let next = ManagedAtomicCounter()
            let failures = ManagedAtomicCounter()
            let start = DispatchTime.now().uptimeNanoseconds
            let cpuStart = processCPUSeconds()
            let strongView = strong, strongConfig = strongConfig
            @Sendable func work() {
                var rng = AugmentRNG(seed: UInt64(pass) &* 1_000_003 &+ UInt64(UInt(bitPattern: Thread.current.hash)))
                var output = [Float](repeating: 0, count: 3 * max(config.crop, 224) * max(config.crop, 224))
                while true {
                    let i = next.increment()
                    if i >= files.count { break }
                    do {
                        let image = try decodeImage(at: files[i], options: options)
                        let view: RGBImage
                        if strongView {
                            let p = sampleStrongView(width: image.width, height: image.height, config: strongConfig, rng: &rng)
                            view = applyStrongView(image, p)
                        } else {
                            view = weakViewCrop(image, resize: config.resize, crop: config.crop)
                        }
                        output.withUnsafeMutableBufferPointer {
                            normalizeCHW(view, mean: config.mean, std: config.std, into: $0.baseAddress!)
                        }
                    } catch {
                        if failures.increment() < 5 { print("  \(error)") }
                    }
                }
            }
            let done = DispatchSemaphore(value: 0)
            for _ in 0..<threads {
                Thread.detachNewThread { work(); done.signal() }
            }
            for _ in 0..<threads { done.wait() }
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            let cpu = processCPUSeconds() - cpuStart
            let failed = failures.value
            print(String(format: "pass %d: %d images in %.2f s = %.1f images/s, %.2f CPU-ms per image (%d unreadable)",
                         pass, files.count, seconds, Double(files.count) / seconds, cpu * 1000 / Double(files.count), failed))
        }
    }
}

/// Position-weighted byte sum Σ b[i]·((i·0x9E3779B1 mod 2^32) | 1) mod 2^64 as 16 hex digits: changes
/// whenever a single byte does; cheap in numpy too (bench_pillow.py --checksums).
func weightedChecksum(_ bytes: [UInt8]) -> String {
    var h: UInt64 = 0
    for (i, b) in bytes.enumerated() {
        let w = (UInt64(i) &* 0x9E37_79B1) & 0xFFFF_FFFF | 1
        h = h &+ UInt64(b) &* w
    }
    let s = String(h, radix: 16)
    return String(repeating: "0", count: 16 - s.count) + s
}

/// A counter shared by the benchmark's threads.
final class ManagedAtomicCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0

    /// Returns the value before incrementing.
    func increment() -> Int {
        lock.lock()
        defer { lock.unlock() }
        count += 1
        return count - 1
    }

    var value: Int {
        lock.lock()
        defer { lock.unlock() }
        return count
    }
}
