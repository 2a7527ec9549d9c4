import CCurl
import Foundation

/// One HTTP POST through libcurl's multi interface, on the caller's thread. The wait for the answer is
/// `curl_multi_poll` in slices of `pollSeconds`: the thread sleeps in the kernel until a socket is ready,
/// libcurl's own timer is due or the slice ends, and `shouldStop` is asked between slices, so a stop
/// request ends the request within one slice and waiting costs no CPU.
///
/// Why not URLSession: on Linux, FoundationNetworking keeps the socket's write source armed after libcurl
/// asks for read readiness only, so while the server has not answered yet the write source fires again and
/// again (a connected socket is always writable) and the daemon spins at one core; its completion handler
/// can also not be interrupted. docs/failures.md ("A hung LLM endpoint") has the figures.
public enum HTTPRequest {
    public struct Response: Sendable, Equatable {
        public var status: Int
        public var body: Data
    }

    public enum Failure: Error, Equatable, Sendable, CustomStringConvertible {
        /// `shouldStop` answered true before the answer was complete.
        case stopped
        /// No complete answer within the request's timeout.
        case timedOut(seconds: Double)
        /// Could not connect, the connection broke, the URL is not http(s), the body is too large, ...
        case failed(String)

        public var description: String {
            switch self {
            case .stopped: return "stopped while waiting for the answer"
            case .timedOut(let s): return "timed out after \(s == s.rounded() ? "\(Int(s))" : "\(s)") s without a complete answer"
            case .failed(let reason): return reason
            }
        }
    }

    /// Bodies larger than this are refused (a chat completion is a few kilobytes).
    public static let maximumBodyBytes = 16 << 20

    private static let initialised: Bool = curl_global_init(Int(CURL_GLOBAL_ALL)) == CURLE_OK

    /// POSTs `body` to `url` (http or https) with `headers` ("Name: value"); returns status and body of
    /// any HTTP answer. Throws `Failure`.
    public static func post(_ url: URL, headers: [String], body: Data, timeout: Double, pollSeconds: Double = 0.1,
                            shouldStop: () -> Bool) throws -> Response {
        guard initialised else { throw Failure.failed("libcurl could not be initialised") }
        guard let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https" else {
            throw Failure.failed("only http and https URLs are supported")
        }
        if shouldStop() { throw Failure.stopped }
        guard let easy = curl_easy_init() else { throw Failure.failed("libcurl could not create a transfer") }
        defer { curl_easy_cleanup(easy) }
        let errorBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
        errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        defer { errorBuffer.deallocate() }
        var list: UnsafeMutablePointer<curl_slist>? = nil
        // No "Expect: 100-continue" round trip for larger bodies.
        for header in headers + ["Expect:"] { list = curl_slist_append(list, header) }
        defer { curl_slist_free_all(list) }
        let sink = BodySink()
        let sinkPointer = Unmanaged.passRetained(sink)
        defer { sinkPointer.release() }

        var setup = [CURLE_OK]
        setup.append(url.absoluteString.withCString { nolad_curl_setopt_pointer(easy, CURLOPT_URL, $0) })
        setup.append("http,https".withCString { nolad_curl_setopt_pointer(easy, CURLOPT_PROTOCOLS_STR, $0) })
        setup.append("nolad".withCString { nolad_curl_setopt_pointer(easy, CURLOPT_USERAGENT, $0) })
        setup.append(nolad_curl_setopt_long(easy, CURLOPT_NOSIGNAL, 1))
        setup.append(nolad_curl_setopt_long(easy, CURLOPT_TIMEOUT_MS, max(1, Int(timeout * 1000))))
        setup.append(nolad_curl_setopt_pointer(easy, CURLOPT_ERRORBUFFER, errorBuffer))
        setup.append(nolad_curl_setopt_pointer(easy, CURLOPT_HTTPHEADER, list))
        setup.append(nolad_curl_setopt_long(easy, CURLOPT_POSTFIELDSIZE, body.count))
        setup.append(body.withUnsafeBytes { nolad_curl_setopt_pointer(easy, CURLOPT_COPYPOSTFIELDS, $0.baseAddress ?? UnsafeRawPointer(errorBuffer)) })
        setup.append(nolad_curl_setopt_write_function(easy) { data, size, count, user in
            let sink = Unmanaged<BodySink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            guard sink.data.count + n <= HTTPRequest.maximumBodyBytes else {
                sink.overflowed = true
                return 0
            }
            if let data, n > 0 { sink.data.append(UnsafeRawPointer(data).assumingMemoryBound(to: UInt8.self), count: n) }
            return n
        })
        setup.append(nolad_curl_setopt_pointer(easy, CURLOPT_WRITEDATA, sinkPointer.toOpaque()))
        if let bad = setup.first(where: { $0 != CURLE_OK }) {
            throw Failure.failed("libcurl refused an option: \(String(cString: curl_easy_strerror(bad)))")
        }

        guard let multi = curl_multi_init() else { throw Failure.failed("libcurl could not create a transfer") }
        defer { curl_multi_cleanup(multi) }
        guard curl_multi_add_handle(multi, easy) == CURLM_OK else { throw Failure.failed("libcurl could not start the transfer") }
        defer { curl_multi_remove_handle(multi, easy) }
        let slice = Int32(max(1, min(1000, pollSeconds * 1000)))
        var running: Int32 = 1
        while true {
            let performed = curl_multi_perform(multi, &running)
            guard performed == CURLM_OK else { throw Failure.failed(String(cString: curl_multi_strerror(performed))) }
            if running == 0 { break }
            if shouldStop() { throw Failure.stopped }
            let polled = curl_multi_poll(multi, nil, 0, slice, nil)
            guard polled == CURLM_OK else { throw Failure.failed(String(cString: curl_multi_strerror(polled))) }
        }
        var left: Int32 = 0
        guard let message = curl_multi_info_read(multi, &left), message.pointee.msg == CURLMSG_DONE else {
            throw Failure.failed("libcurl ended the transfer without a result")
        }
        let result = nolad_curl_message_result(message)
        switch result {
        case CURLE_OK:
            break
        case CURLE_OPERATION_TIMEDOUT:
            throw Failure.timedOut(seconds: timeout)
        case CURLE_WRITE_ERROR where sink.overflowed:
            throw Failure.failed("the answer is larger than \(maximumBodyBytes >> 20) MiB")
        default:
            let detail = String(cString: errorBuffer)
            throw Failure.failed(detail.isEmpty ? String(cString: curl_easy_strerror(result)) : detail)
        }
        var status = 0
        _ = nolad_curl_response_code(easy, &status)
        return Response(status: status, body: sink.data)
    }
}

private final class BodySink {
    var data = Data()
    var overflowed = false
}
