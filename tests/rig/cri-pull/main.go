// Command cri-pull is the rig's minimal CRI image client: it asks a containerd's CRI plugin to
// pull an image (PullImage, exactly what the kubelet sends) and reports what containerd recorded
// (ImageStatus). It exists because Debian does not package crictl and the Go module proxy
// reachable here does not serve sigs.k8s.io/cri-tools.
//
// Usage:
//
//	cri-pull -endpoint unix:///path/containerd.sock [-timeout 10m] pull   IMAGE
//	cri-pull -endpoint unix:///path/containerd.sock [-timeout 10m] status IMAGE
//	cri-pull -endpoint unix:///path/containerd.sock [-timeout 10m] remove IMAGE
//
// Output is one JSON object on stdout:
//
//	{"image_ref":"sha256:…","repo_tags":[…],"repo_digests":[…],"size":N,"elapsed_ms":N}
//
// Exit status: 0 on success, 1 when the RPC failed (message on stderr), 2 on usage errors,
// 3 when `status` finds no such image.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

type result struct {
	ImageRef    string   `json:"image_ref"`
	RepoTags    []string `json:"repo_tags"`
	RepoDigests []string `json:"repo_digests"`
	Size        uint64   `json:"size"`
	ElapsedMs   int64    `json:"elapsed_ms"`
}

func main() {
	endpoint := flag.String("endpoint", "", "CRI endpoint, unix:///path/to/containerd.sock")
	timeout := flag.Duration("timeout", 10*time.Minute, "deadline for the whole call")
	flag.Parse()
	if *endpoint == "" || flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: cri-pull -endpoint unix:///sock [-timeout D] pull|status|remove IMAGE")
		os.Exit(2)
	}
	verb, image := flag.Arg(0), flag.Arg(1)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	// grpc's "unix://" resolver takes an absolute path after the scheme.
	target := *endpoint
	if !strings.HasPrefix(target, "unix://") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(1, "connect %s: %v", target, err)
	}
	defer conn.Close()
	images := runtime.NewImageServiceClient(conn)
	spec := &runtime.ImageSpec{Image: image}

	start := time.Now()
	switch verb {
	case "pull":
		resp, err := images.PullImage(ctx, &runtime.PullImageRequest{Image: spec})
		if err != nil {
			fail(1, "PullImage %s: %v", image, err)
		}
		elapsed := time.Since(start).Milliseconds()
		out := status(ctx, images, spec)
		if out == nil {
			fail(1, "PullImage %s returned %s but ImageStatus finds nothing", image, resp.ImageRef)
		}
		out.ImageRef = resp.ImageRef
		out.ElapsedMs = elapsed
		emit(out)
	case "status":
		out := status(ctx, images, spec)
		if out == nil {
			fail(3, "no image %s", image)
		}
		emit(out)
	case "remove":
		if _, err := images.RemoveImage(ctx, &runtime.RemoveImageRequest{Image: spec}); err != nil {
			fail(1, "RemoveImage %s: %v", image, err)
		}
		emit(&result{ElapsedMs: time.Since(start).Milliseconds()})
	default:
		fail(2, "unknown verb %q (want pull, status or remove)", verb)
	}
}

// status returns what containerd recorded for the image, or nil when it has none.
func status(ctx context.Context, images runtime.ImageServiceClient, spec *runtime.ImageSpec) *result {
	resp, err := images.ImageStatus(ctx, &runtime.ImageStatusRequest{Image: spec})
	if err != nil {
		fail(1, "ImageStatus %s: %v", spec.Image, err)
	}
	img := resp.GetImage()
	if img == nil {
		return nil
	}
	return &result{
		ImageRef:    img.GetId(),
		RepoTags:    nonNil(img.GetRepoTags()),
		RepoDigests: nonNil(img.GetRepoDigests()),
		Size:        img.GetSize(),
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func emit(r *result) {
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		fail(1, "write result: %v", err)
	}
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cri-pull: "+format+"\n", args...)
	os.Exit(code)
}
